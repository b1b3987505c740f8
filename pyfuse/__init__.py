"""pyfuse: fused kernels for collaborating LLMs — sparse-mask merging, cross-vocabulary logit
ensembling and speculative-decoding verification — as drop-in torch ops.

Families live in submodules (``pyfuse.merge``, ``pyfuse.ensemble``, ``pyfuse.spec``); the most used
functions are re-exported here and imported on first use. The modules that define the ``torch.ops.pyfuse``
ops are imported with ``pyfuse`` itself, so a saved or exported graph that names an op needs only ``import
pyfuse`` (~80 ms on top of the ~1.6 s ``import pyfuse`` takes on the 2-core dev VM).
"""
from __future__ import annotations

import importlib

from ._backend import BACKEND_NAMES, BackendStatus, backends, resolve_backend, use_backend
from ._backend_error import BackendError
from ._output_cache import empty_output_cache, set_output_cache_limit
from .philox import rand

__version__ = "0.1.0"

# name -> module that defines it (imported lazily by __getattr__).
_LAZY = {
    "magnitude_prune": "pyfuse.prune",
    "random_prune": "pyfuse.prune",
    "merge_tensors": "pyfuse.merge",
    "task_arithmetic": "pyfuse.merge",
    "ties": "pyfuse.merge",
    "dare_linear": "pyfuse.merge",
    "dare_ties": "pyfuse.merge",
    "breadcrumbs": "pyfuse.merge",
    "breadcrumbs_ties": "pyfuse.merge",
    "della": "pyfuse.merge",
    "della_linear": "pyfuse.merge",
    "merge_state_dicts": "pyfuse.merge",
    "merge_models": "pyfuse.merge",
}
# The modules that register torch.ops.pyfuse ops (pyfuse.philox, for `rand`, is imported above).
_OP_MODULES = ("pyfuse.prune", "pyfuse.merge.op", "pyfuse.ensemble.ops", "pyfuse.spec.chain", "pyfuse.spec.tree")
_SUBMODULES = ("merge", "ensemble", "spec", "prune", "integrations", "bench", "reference", "kernels")

__all__ = ["BACKEND_NAMES", "BackendError", "BackendStatus", "backends", "empty_output_cache", "rand",
           "resolve_backend", "set_output_cache_limit", "use_backend", *_LAZY, *_SUBMODULES]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"pyfuse.{name}")
    raise AttributeError(f"module 'pyfuse' has no attribute {name!r}")


for _module in _OP_MODULES:
    importlib.import_module(_module)

"""pyfuse: fused kernels for collaborating LLMs — sparse-mask merging, cross-vocabulary logit
ensembling and speculative-decoding verification — as drop-in torch ops.

Families live in submodules (``pyfuse.merge``, ``pyfuse.ensemble``, ``pyfuse.spec``); the most used
functions are re-exported here and imported on first use, so ``import pyfuse`` stays light.
"""
from __future__ import annotations

import importlib

from ._backend import BACKEND_NAMES, BackendStatus, backends, resolve_backend, use_backend
from ._backend_error import BackendError
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
_SUBMODULES = ("merge", "ensemble", "spec", "prune", "integrations", "bench", "reference", "kernels")

__all__ = ["BACKEND_NAMES", "BackendError", "BackendStatus", "backends", "rand", "resolve_backend",
           "use_backend", *_LAZY, *_SUBMODULES]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"pyfuse.{name}")
    raise AttributeError(f"module 'pyfuse' has no attribute {name!r}")

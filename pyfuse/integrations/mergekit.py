"""mergekit 0.1.5 on pyfuse: ``install()`` swaps the generalized task arithmetic methods of mergekit's
registry for pyfuse-backed ones; ``main`` is the ``pyfuse-mergekit`` console script.

mergekit has no plugin entry point and its ``register()`` rejects existing names, so ``install`` replaces the
entries of ``mergekit.merge_methods.registry._METHODS`` by subclasses of ``GeneralizedTaskArithmeticMerge``
built from the same fields: the method spec (names, YAML parameters, defaults) is unchanged and every lookup
by name (``mergekit-yaml``, ``registry.get``, ``mergekit.merge_methods.api``) reaches pyfuse. It must run in
the process that plans the merge, before the planner is built.

Intended differences from mergekit (see ``pyfuse.merge.presets`` for the shared semantics):

- DARE/DELLA masks come from pyfuse's Philox keyed by ``--random-seed`` (``install(seed=...)``) and the
  tensor's name, so they do not depend on the execution order, the device or the number of GPUs; without a
  seed each tensor draws its key from torch's global generator, as mergekit draws its masks.
- Magnitude top-k and breadcrumbs ties at the threshold go to the lowest flat index (mergekit's unstable
  ``argsort`` leaves them unspecified).
- Arithmetic is float32 whatever the compute dtype, rounded once at the end (mergekit rounds the deltas, the
  weights and every intermediate to bf16/fp16), so in bf16 pyfuse is usually the closer to the float32
  merge; where mergekit's rounded deltas move an element across the top-k threshold or flip its election,
  single elements differ by more than rounding.
- DELLA ranks are exact in float32 (mergekit holds them in bf16 for bf16 tensors: exact only up to 256).
- ``int8_mask`` is accepted and has no effect (pyfuse materialises no mask).
- float64 merges (``dtype: float64``) fall back to mergekit's own implementation, with a warning.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from typing import Any, Optional

import torch

try:
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
    from mergekit.sparsify import SparsificationMethod
except ImportError as e:  # pragma: no cover - exercised only without mergekit
    raise ImportError("pyfuse.integrations.mergekit needs mergekit 0.1.5: pip install 'pyfuse[mergekit]'") from e

from pyfuse._validate import FLOAT_DTYPES
from pyfuse.merge.models import tensor_seed
from pyfuse.merge.presets import PRESETS, gta_merge

_SPARSIFY = {
    None: "none",
    SparsificationMethod.magnitude: "magnitude",
    SparsificationMethod.random: "random",
    SparsificationMethod.magnitude_outliers: "breadcrumbs",
    SparsificationMethod.della_magprune: "della",
}
_originals: dict = {}


@dataclasses.dataclass(frozen=True)
class PyfuseTaskArithmeticMerge(GeneralizedTaskArithmeticMerge):
    """mergekit's generalized task arithmetic, merged by ``pyfuse.merge_tensors`` in one fused pass."""

    seed: Optional[int] = None
    backend: Optional[str] = None

    def merge_group(self, group, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries or base.dtype not in FLOAT_DTYPES:
            if entries:  # said, not silent (shown once per dtype: Python's default warning filter)
                warnings.warn(f"pyfuse: {base.dtype} tensors are merged by mergekit's own implementation (pyfuse's "
                              f"kernels take float32, float16 and bfloat16)", stacklevel=2)
            return super().merge_group(group, **parameters)
        sparsify = _SPARSIFY[self.sparsification_method]
        # mergekit reads density >= 1 as "keep all" and gamma >= 1 like 1, density <= 0 as "keep nothing"
        # except for DARE, where torch.bernoulli rejects a negative density (merge_tensors rejects it too).
        low = -math.inf if sparsify == "random" else 0.0
        knobs = {"density": [min(max(d, low), 1.0) for d in parameters["density"].values_for(entries)]}
        if "gamma" in parameters:
            knobs["gamma"] = [min(g, 1.0) for g in parameters["gamma"].values_for(entries)]
        if "epsilon" in parameters:
            knobs["epsilon"] = parameters["epsilon"].values_for(entries)
        seed = None if self.seed is None else tensor_seed(self.seed, group.metadata.name or "")
        return gta_merge(
            base, [e.tensor for e in entries], parameters["weight"].values_for(entries), sparsify=sparsify,
            consensus="none" if self.consensus_method is None else self.consensus_method.value,
            normalize=parameters["normalize"], rescale=parameters["rescale"], lam=parameters["lambda"], seed=seed,
            out_dtype=base.dtype, backend=self.backend, **knobs)


class _Installed:
    """Returned by ``install()``: leaving a ``with`` block calls ``uninstall()``."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        uninstall()


def install(seed: Optional[int] = None, backend: Optional[str] = None) -> _Installed:
    """Replace mergekit's ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``breadcrumbs``,
    ``breadcrumbs_ties``, ``della`` and ``della_linear`` by pyfuse-backed methods with the same YAML
    parameters. ``seed`` keys the random methods (combined with each tensor's name); ``backend`` picks a
    pyfuse backend (default: by device). Calling it again changes seed/backend; usable as a context manager."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    for name in PRESETS:
        original = _originals.get(name, registry._METHODS[name])
        if not isinstance(original, GeneralizedTaskArithmeticMerge):
            raise TypeError(f"mergekit method {name!r} is a {type(original).__name__}, expected mergekit's "
                            f"GeneralizedTaskArithmeticMerge (unsupported mergekit version?)")
        fields = {f.name: getattr(original, f.name) for f in dataclasses.fields(GeneralizedTaskArithmeticMerge)}
        _originals[name] = original
        registry._METHODS[name] = PyfuseTaskArithmeticMerge(**fields, seed=seed, backend=backend)
    return _Installed()


def uninstall() -> None:
    """Put mergekit's own methods back (no-op when not installed)."""
    for name, original in _originals.items():
        registry._METHODS[name] = original
    _originals.clear()


def main(argv=None) -> None:
    """``pyfuse-mergekit CONFIG_FILE OUT_PATH [mergekit-yaml options]``: ``mergekit-yaml`` with pyfuse
    installed, the Philox key taken from ``--random-seed``."""
    from mergekit.scripts.run_yaml import main as run_yaml

    args = sys.argv[1:] if argv is None else list(argv)
    # Parse once without side effects (help, errors) just to read --random-seed; mergekit parses again.
    ctx = run_yaml.make_context("pyfuse-mergekit", list(args), resilient_parsing=True)
    install(seed=ctx.params.get("random_seed"))
    try:
        run_yaml.main(args, prog_name="pyfuse-mergekit")
    finally:
        uninstall()

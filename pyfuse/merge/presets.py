"""Named merge methods with mergekit 0.1.5's semantics and defaults, on top of ``merge_tensors``.

Every preset is mergekit's generalized task arithmetic (``GeneralizedTaskArithmeticMerge``) with one
sparsifier and one consensus rule; ``PRESETS`` is the table (the README and the mergekit integration use it).
The mergekit knobs map onto ``merge_tensors`` as:

- ``rescale=True`` -> ``rescale="l1"`` (mergekit restores each task vector's L1 norm, not 1/density);
- ``normalize=True`` -> divide by the summed weights of the agreeing models (with consensus) or of all
  models (without);
- election on the weighted task vectors, ties to +; magnitude top-k keeps at least one element when
  density > 0 (``k_min_one``), ties at the threshold go to the lowest flat index.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pyfuse.merge.tensors import merge_tensors


@dataclass(frozen=True)
class Preset:
    """One mergekit method: its sparsifier, its consensus and the defaults of its boolean knobs."""

    name: str
    sparsify: str  # merge_tensors' name for mergekit's sparsification method
    consensus: str  # "none" or "sum"
    normalize: bool
    rescale: bool


PRESETS = {p.name: p for p in (
    Preset("task_arithmetic", "none", "none", normalize=False, rescale=False),
    Preset("ties", "magnitude", "sum", normalize=True, rescale=False),
    Preset("dare_linear", "random", "none", normalize=False, rescale=True),
    Preset("dare_ties", "random", "sum", normalize=False, rescale=True),
    Preset("breadcrumbs", "breadcrumbs", "none", normalize=False, rescale=False),
    Preset("breadcrumbs_ties", "breadcrumbs", "sum", normalize=False, rescale=False),
    Preset("della", "della", "sum", normalize=True, rescale=True),
    Preset("della_linear", "della", "none", normalize=False, rescale=True),
)}


def gta_merge(base, models, weights=None, *, sparsify: str, consensus: str, normalize: bool, rescale: bool,
              density=1.0, gamma=0.01, epsilon=0.15, lam: float = 1.0, seed=None, out_dtype=None,
              backend=None) -> torch.Tensor:
    """mergekit's generalized task arithmetic with its boolean knobs, as one ``merge_tensors`` call."""
    for name, flag in (("normalize", normalize), ("rescale", rescale)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if normalize:
        divisor = "agree_weight" if consensus != "none" else "all_weight"
    else:
        divisor = "none"
    return merge_tensors(base, models, weights, sparsify=sparsify, density=density, gamma=gamma, epsilon=epsilon,
                         rescale="l1" if rescale else "none", consensus=consensus, consensus_on="weighted",
                         normalize=divisor, lam=lam, k_min_one=True, seed=seed, out_dtype=out_dtype,
                         backend=backend)


def _run(name: str, base, models, weights, **knobs) -> torch.Tensor:
    p = PRESETS[name]
    return gta_merge(base, models, weights, sparsify=p.sparsify, consensus=p.consensus, **knobs)


def task_arithmetic(base, models, weights=None, *, normalize=False, lam=1.0, out_dtype=None, backend=None):
    """``base + lam * sum_i w_i (x_i - base)`` (divided by ``sum_i w_i`` when ``normalize``).

    ``models``: a list of tensors shaped like ``base``; ``weights``: one float per model (default 1.0),
    as a list or 1-D tensor. Returns ``base``'s dtype unless ``out_dtype``."""
    return _run("task_arithmetic", base, models, weights, normalize=normalize, rescale=False, lam=lam,
                out_dtype=out_dtype, backend=backend)


def ties(base, models, weights=None, *, density=1.0, normalize=True, rescale=False, lam=1.0, out_dtype=None,
         backend=None):
    """TIES: keep the top ``density`` fraction of each |task vector|, elect a sign per element from the
    weighted sum, average the agreeing weighted deltas (``normalize``: by their summed weights)."""
    return _run("ties", base, models, weights, density=density, normalize=normalize, rescale=rescale, lam=lam,
                out_dtype=out_dtype, backend=backend)


def dare_linear(base, models, weights=None, *, density=1.0, normalize=False, rescale=True, lam=1.0, seed=None,
                out_dtype=None, backend=None):
    """DARE: drop each delta element with probability ``1 - density`` (seeded Philox), restore each task
    vector's L1 norm (``rescale``), weighted sum."""
    return _run("dare_linear", base, models, weights, density=density, normalize=normalize, rescale=rescale,
                lam=lam, seed=seed, out_dtype=out_dtype, backend=backend)


def dare_ties(base, models, weights=None, *, density=1.0, normalize=False, rescale=True, lam=1.0, seed=None,
              out_dtype=None, backend=None):
    """DARE drop and L1 rescale, then TIES sign election and disjoint merge (no divisor by default)."""
    return _run("dare_ties", base, models, weights, density=density, normalize=normalize, rescale=rescale,
                lam=lam, seed=seed, out_dtype=out_dtype, backend=backend)


def breadcrumbs(base, models, weights=None, *, density=1.0, gamma=0.01, normalize=False, rescale=False, lam=1.0,
                out_dtype=None, backend=None):
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest |delta| (outliers) and keep the next
    ``density`` fraction; weighted sum."""
    return _run("breadcrumbs", base, models, weights, density=density, gamma=gamma, normalize=normalize,
                rescale=rescale, lam=lam, out_dtype=out_dtype, backend=backend)


def breadcrumbs_ties(base, models, weights=None, *, density=1.0, gamma=0.01, normalize=False, rescale=False,
                     lam=1.0, out_dtype=None, backend=None):
    """Breadcrumbs selection, then TIES sign election and disjoint merge."""
    return _run("breadcrumbs_ties", base, models, weights, density=density, gamma=gamma, normalize=normalize,
                rescale=rescale, lam=lam, out_dtype=out_dtype, backend=backend)


def della(base, models, weights=None, *, density=1.0, epsilon=0.15, normalize=True, rescale=True, lam=1.0,
          seed=None, out_dtype=None, backend=None):
    """DELLA: keep each element with probability ``density - epsilon + 2 epsilon * rank / (ncols - 1)``
    (magnitude rank within its row), L1 rescale, TIES election, agreeing-weight average."""
    return _run("della", base, models, weights, density=density, epsilon=epsilon, normalize=normalize,
                rescale=rescale, lam=lam, seed=seed, out_dtype=out_dtype, backend=backend)


def della_linear(base, models, weights=None, *, density=1.0, epsilon=0.15, normalize=False, rescale=True,
                 lam=1.0, seed=None, out_dtype=None, backend=None):
    """DELLA selection and L1 rescale, weighted sum (no election)."""
    return _run("della_linear", base, models, weights, density=density, epsilon=epsilon, normalize=normalize,
                rescale=rescale, lam=lam, seed=seed, out_dtype=out_dtype, backend=backend)


FUNCTIONS = {f.__name__: f for f in (task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties,
                                     della, della_linear)}

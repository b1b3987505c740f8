"""PEFT's merge functions (``peft.utils.merge_utils``, PEFT 0.21.2) on pyfuse, with PEFT's signatures.

Same semantics as PEFT: no base (the inputs are task tensors), unweighted sign election, the divisor of
``ties``/``dare_ties`` is the number of agreeing models, DARE rescales by 1/density, magnitude pruning keeps
``int(density * numel)`` elements (0 allowed), the output dtype is PEFT's. Intended differences:

- top-k ties at the threshold go to the lowest flat index (PEFT's ``torch.topk`` leaves them unspecified);
- the DARE mask comes from pyfuse's Philox (keyword ``seed``; without it, a seed drawn from torch's global
  generator, so ``torch.manual_seed`` still makes runs repeatable), not from ``torch.bernoulli``;
- arithmetic is float32 throughout (PEFT prunes and rescales half-precision tensors in their own dtype);
- ``dare_*`` with density 0 returns zeros (PEFT 0.21.2 returns NaN, peft#3530).

``patch()`` makes ``LoraModel.add_weighted_adapter`` use these functions (also as a context manager);
``unpatch()`` restores PEFT's. PEFT itself is imported only by ``patch``/``unpatch``.
"""
from __future__ import annotations

import warnings

import torch

from pyfuse.merge.tensors import merge_tensors

_ELECTION = {"total": "sum", "frequency": "count"}


def _merge(task_tensors, weights, *, ties_divisor: bool, **knobs) -> torch.Tensor:
    if isinstance(task_tensors, torch.Tensor) or not isinstance(task_tensors, (list, tuple)) or not task_tensors:
        raise TypeError("task_tensors must be a non-empty list of tensors")
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor (one weight per task tensor), got {type(weights).__name__}")
    # PEFT's result dtype: type promotion of the tensors with the weights; the count divisor of
    # disjoint_merge is float32, which promotes ties/dare_ties once more.
    dtype = torch.promote_types(task_tensors[0].dtype, weights.dtype)
    if ties_divisor:
        dtype = torch.promote_types(dtype, torch.float32)
    out = merge_tensors(None, task_tensors, weights, out_dtype=torch.float32, **knobs)
    return out.to(dtype)


def _density(density) -> float:
    if isinstance(density, (int, float)) and not isinstance(density, bool) and density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be performed.")
        return 1.0
    return density


def _election(majority_sign_method) -> str:
    if majority_sign_method not in _ELECTION:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    return _ELECTION[majority_sign_method]


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_i weights[i] * task_tensors[i]``."""
    return _merge(task_tensors, weights, ties_divisor=False)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest |values| of each tensor, then the weighted sum."""
    return _merge(task_tensors, weights, ties_divisor=False, sparsify="magnitude", density=_density(density))


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: str = "total") -> torch.Tensor:
    """Magnitude prune, elect a sign from the unweighted tensors (``total``: sum, ``frequency``: sign
    count), weighted sum of the agreeing values divided by how many agree."""
    return _merge(task_tensors, weights, ties_divisor=True, sparsify="magnitude", density=_density(density),
                  consensus=_election(majority_sign_method), consensus_on="unweighted", normalize="agree_count")


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float, *,
                seed: int | None = None) -> torch.Tensor:
    """Drop each value with probability ``1 - density``, rescale by ``1 / density``, weighted sum."""
    return _merge(task_tensors, weights, ties_divisor=False, sparsify="random", density=_density(density),
                  rescale="inverse_density", seed=seed)


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: str = "total", *, seed: int | None = None) -> torch.Tensor:
    """DARE drop and ``1 / density`` rescale, then ``ties``' election and disjoint merge."""
    return _merge(task_tensors, weights, ties_divisor=True, sparsify="random", density=_density(density),
                  rescale="inverse_density", consensus=_election(majority_sign_method), consensus_on="unweighted",
                  normalize="agree_count", seed=seed)


_NAMES = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
_originals: dict = {}


class _Patch:
    """Returned by ``patch()``: leaving a ``with`` block undoes the patch."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        unpatch()


def patch() -> _Patch:
    """Rebind the five merge functions ``peft.tuners.lora.model`` imported from PEFT to pyfuse's, so that
    ``add_weighted_adapter(..., combination_type=...)`` (and its ``*_svd`` variants) runs on pyfuse.
    Idempotent; ``unpatch()`` or the end of a ``with patch():`` block restores PEFT's functions."""
    from peft.tuners.lora import model as lora_model

    if not _originals:
        for name in _NAMES:
            _originals[name] = getattr(lora_model, name)
            setattr(lora_model, name, globals()[name])
    return _Patch()


def unpatch() -> None:
    """Restore PEFT's own merge functions (no-op when not patched)."""
    if _originals:
        from peft.tuners.lora import model as lora_model

        for name, fn in _originals.items():
            setattr(lora_model, name, fn)
        _originals.clear()

"""``pyfuse.merge_tensors``: the public fused merge of K task vectors, with argument validation."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from pyfuse import _validate
from pyfuse._backend import resolve_backend
from pyfuse.merge.op import CONSENSUS, NORMALIZE, RESCALE, SPARSIFY, merge_task_vectors


def _choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _per_model(name: str, value, k: int, check) -> list[float]:
    """A scalar broadcast to K models, or exactly K values (sequence or 1-D tensor)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ValueError(f"{name} must be a scalar or a 1-D tensor of {k} values, got shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != k:
            raise ValueError(f"{name} must have one value per model ({k}), got {len(value)}")
        return [check(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [check(name, value)] * k


def merge_tensors(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    weights=None,
    *,
    sparsify: str = "none",
    density=1.0,
    gamma=0.01,
    epsilon=0.15,
    rescale: str = "none",
    consensus: str = "none",
    consensus_on: str = "weighted",
    normalize: str = "none",
    lam: float = 1.0,
    k_min_one: bool = False,
    seed: int | None = None,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Merge K fine-tuned tensors (or task vectors, when ``base`` is None) in one fused pass.

    out = base + lam * sum_i a_i * w_i * c_i * sparsify(x_i - base) / Q; see ``pyfuse.reference.merge`` for
    the exact definition of every knob. ``sparsify``: "none" | "magnitude" (exact top-k of |delta|, ties to
    the lowest index; ``k_min_one`` keeps at least one element for density > 0, as mergekit 0.1.5) |
    "random" (DARE, seeded Philox) | "breadcrumbs" (drops the ``gamma`` largest, keeps ``density``) |
    "della" (rank-based keep probability density +/- epsilon along the last dim). ``rescale``: "none" |
    "inverse_density" | "l1" (mergekit: restores each task vector's L1 norm). ``consensus``: "none" | "sum" |
    "count" sign election (ties count as +) on the weighted or unweighted (``consensus_on``) task vectors.
    ``normalize``: "none" | "agree_weight" | "agree_count" | "all_weight" divisor.

    float32/float16/bfloat16 inputs, float32 arithmetic; output dtype ``out_dtype`` or the inputs' dtype.
    Extra memory on the cpu/cuda/triton backends: O(K) scalars plus per-thread scratch (della: one row per
    model per thread); never a stacked copy, mask or index tensor (non-contiguous inputs are copied once).
    """
    if isinstance(models, torch.Tensor) or not isinstance(models, Sequence):
        raise TypeError(f"models must be a sequence of tensors, got {type(models).__name__}")
    models = list(models)
    k = len(models)
    if k == 0:
        raise ValueError("models must hold at least one tensor, got none")
    for i, m in enumerate(models):
        _validate.check_float_tensor(f"models[{i}]", m)
    ref_name, ref = ("base", base) if base is not None else ("models[0]", models[0])
    if base is not None:
        _validate.check_float_tensor("base", base)
    for i, m in enumerate(models):
        if m.shape != ref.shape:
            raise ValueError(f"models[{i}] has shape {tuple(m.shape)}, expected {tuple(ref.shape)} like {ref_name}")
        if m.dtype != ref.dtype:
            raise TypeError(f"models[{i}] has dtype {m.dtype}, expected {ref.dtype} like {ref_name}")
    device = _validate.check_same_device(base=base, **{f"models[{i}]": m for i, m in enumerate(models)})

    weights = [1.0] * k if weights is None else _per_model("weights", weights, k, _real)
    sparsify = _choice("sparsify", sparsify, SPARSIFY)
    densities = _per_model("density", density, k, _validate.check_fraction)
    gammas = _per_model("gamma", gamma, k, _validate.check_fraction)
    epsilons = _per_model("epsilon", epsilon, k, _validate.check_fraction)
    if sparsify == "della":
        if ref.dim() > 2:
            raise ValueError(f"sparsify='della' ranks along the last dim of 1-D or 2-D tensors; got shape "
                             f"{tuple(ref.shape)}")
        for i, (rho, eps) in enumerate(zip(densities, epsilons)):
            if 0 < rho < 1 and not (0 < rho - eps and rho + eps < 1):  # mergekit 0.1.5: epsilon 0 is valid
                raise ValueError(f"epsilon[{i}] = {eps} must keep density[{i}] +/- epsilon inside (0, 1) for "
                                 f"sparsify='della' (density {rho})")
    rescale = _choice("rescale", rescale, RESCALE)
    consensus = _choice("consensus", consensus, CONSENSUS)
    consensus_on = _choice("consensus_on", consensus_on, ("weighted", "unweighted"))
    normalize = _choice("normalize", normalize, NORMALIZE)
    lam = _real("lam", lam)
    if not isinstance(k_min_one, bool):
        raise TypeError(f"k_min_one must be a bool, got {type(k_min_one).__name__}")
    if seed is None:
        # Random methods without a seed draw one from torch's global generator (reproducible under manual_seed).
        seed = int(torch.randint(0, 2**62, (1,)).item()) if sparsify in ("random", "della") else 0
    seed = _validate.check_seed("seed", seed)
    if out_dtype is None:
        out_dtype = ref.dtype
    elif out_dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {out_dtype}")
    name = resolve_backend(device, backend)
    signed_seed = seed - (1 << 64) if seed >= 1 << 63 else seed  # the op's int is int64
    return merge_task_vectors(base, models, weights, densities, gammas, epsilons, sparsify, rescale, consensus,
                              consensus_on == "weighted", normalize, lam, signed_seed, k_min_one, out_dtype, name)

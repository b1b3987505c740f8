"""The custom op ``pyfuse::merge_task_vectors``: its fake, the per-model plan shared by every backend,
and the backend glue. Arguments arrive validated (``pyfuse.merge.tensors.merge_tensors``)."""
from __future__ import annotations

import numpy as np
import torch

from pyfuse import _ext
from pyfuse._backend import call_kernel, register_kernel
from pyfuse._library import library_op
from pyfuse.reference import merge as ref

OP = "merge_task_vectors"
SPARSIFY = ("none", "magnitude", "random", "breadcrumbs", "della")
RESCALE = ("none", "inverse_density", "l1")
CONSENSUS = ("none", "sum", "count")
NORMALIZE = ("none", "agree_weight", "agree_count", "all_weight")
# Philox purposes (counter word 3) of the merge draws; the stream (word 2) is the model index.
PURPOSE = {"random": 0x6D726701, "della": 0x6D726702}


def _f32(v: float) -> float:
    return float(np.float32(v))


def plan(n: int, weights, densities, gammas, epsilons, sparsify: str, rescale: str, k_min_one: bool) -> dict:
    """Per-model integers and float32-rounded scalars that every backend uses identically.

    Magnitude keeps the top k_keep = floor(density * n) (at least 1 when ``k_min_one`` and density > 0);
    breadcrumbs keeps the top k_keep = n - n_bot minus the top k_drop = n - n_bot - target_n
    (mergekit 0.1.5: target_n = floor(density n), n_bot = max(0, n - target_n - floor(gamma n))).
    Random/della keep an element iff its uniform < p_keep (+ p_span * row rank / (ncols - 1) for della).
    """
    p = {"weights": [_f32(w) for w in weights], "keep_all": [], "k_keep": [], "k_drop": [], "p_keep": [],
         "p_span": [], "scale": [], "purpose": PURPOSE.get(sparsify, 0)}
    for rho, gamma, eps in zip(densities, gammas, epsilons):
        keep_all = sparsify == "none" or rho >= 1.0
        k_keep, k_drop = n, 0
        if sparsify == "magnitude" and not keep_all:
            k_keep = int(rho * n)
            if k_min_one and rho > 0 and n > 0:
                k_keep = max(1, k_keep)
        elif sparsify == "breadcrumbs" and not keep_all:
            target = int(rho * n)
            n_bot = max(0, n - target - int(gamma * n))
            k_keep, k_drop = n - n_bot, n - n_bot - target
        p_keep, p_span = _f32(min(rho, 1.0)), 0.0
        if sparsify == "della" and 0 < rho < 1:
            p_keep, p_span = _f32(rho - eps), _f32(2 * eps)
        p["keep_all"].append(keep_all)
        p["k_keep"].append(k_keep)
        p["k_drop"].append(k_drop)
        p["p_keep"].append(p_keep)
        p["p_span"].append(p_span)
        p["scale"].append(_f32(1.0 / rho) if rescale == "inverse_density" and rho > 0 else
                          (0.0 if rescale == "inverse_density" else 1.0))
    q = np.float32(0)
    for w in p["weights"]:
        q = np.float32(q + np.float32(w))
    p["all_weight_divisor"] = 1.0 if abs(float(q)) < 1e-8 else float(q)
    return p


def della_ncols(shape) -> int:
    """DELLA ranks along the last dim of a 2-D tensor; a 1-D (or 0-D) tensor is one row."""
    return shape[-1] if len(shape) == 2 else max(1, int(np.prod(shape, dtype=np.int64)))


@library_op("merge_task_vectors")
def merge_task_vectors(base: torch.Tensor | None, models: list[torch.Tensor], weights: list[float],
                       densities: list[float], gammas: list[float], epsilons: list[float], sparsify: str,
                       rescale: str, consensus: str, consensus_weighted: bool, normalize: str, lam: float,
                       seed: int, k_min_one: bool, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    shape = models[0].shape
    p = plan(models[0].numel(), weights, densities, gammas, epsilons, sparsify, rescale, k_min_one)
    args = (base, list(models), p, sparsify, rescale, consensus, consensus_weighted, normalize, lam,
            seed % (1 << 64), out_dtype)
    if backend == "reference":
        return call_kernel(OP, backend, *args)
    out = _ext.new_output(shape, out_dtype, models[0].device)
    if out.numel() == 0:
        return out
    base = base.contiguous() if base is not None else None
    models = [m.contiguous() for m in models]
    call_kernel(OP, backend, out, base, models, *args[2:])
    return out


@merge_task_vectors.register_fake
def _(base, models, weights, densities, gammas, epsilons, sparsify, rescale, consensus, consensus_weighted,
      normalize, lam, seed, k_min_one, out_dtype, backend):
    return models[0].new_empty(models[0].shape, dtype=out_dtype)


@register_kernel(OP, "reference")
def _reference(base, models, p, sparsify, rescale, consensus, weighted, normalize, lam, seed, out_dtype):
    return ref.merge_task_vectors(base, models, p, sparsify, rescale, consensus, weighted, normalize, lam, seed,
                                  out_dtype)


def kernel_args(out, base, models, p, sparsify, rescale, consensus, weighted, normalize, lam, seed):
    """The flat argument list of the C++ (CPU and CUDA) entry points, in their order."""
    return (out.data_ptr(), 0 if base is None else base.data_ptr(), [m.data_ptr() for m in models],
            out.numel(), della_ncols(out.shape), _ext.dtype_code(models[0]), _ext.dtype_code(out),
            p["weights"], p["scale"], p["keep_all"], p["k_keep"], p["k_drop"], p["p_keep"], p["p_span"],
            SPARSIFY.index(sparsify), RESCALE.index(rescale), CONSENSUS.index(consensus), weighted,
            NORMALIZE.index(normalize), p["all_weight_divisor"], _f32(lam), seed, p["purpose"])


@register_kernel(OP, "cpu")
def _cpu(out, base, models, p, sparsify, rescale, consensus, weighted, normalize, lam, seed, out_dtype):
    _ext.cpu_ext().merge_task_vectors(*kernel_args(out, base, models, p, sparsify, rescale, consensus, weighted,
                                                   normalize, lam, seed))


@register_kernel(OP, "cuda")
def _cuda(out, base, models, p, sparsify, rescale, consensus, weighted, normalize, lam, seed, out_dtype):
    _ext.cuda_ext().merge_task_vectors(*kernel_args(out, base, models, p, sparsify, rescale, consensus, weighted,
                                                    normalize, lam, seed), _ext.stream_of(out))


@register_kernel(OP, "triton")
def _triton(out, base, models, p, sparsify, rescale, consensus, weighted, normalize, lam, seed, out_dtype):
    from pyfuse.kernels import merge as tk

    tk.merge_task_vectors(out, base, models, p, sparsify, rescale, consensus, weighted, normalize, lam, seed)

"""``pyfuse.magnitude_prune`` and ``pyfuse.random_prune``: sparsify one tensor (the primitives of TIES and
DARE). Semantics are stated in ``pyfuse.reference.prune``; every backend matches it exactly.

Memory: the output plus O(histogram) scratch. A non-contiguous input is copied into the output first and
pruned in place there, so no temporary the size of the input is made either way.
"""
from __future__ import annotations

import torch

from . import _validate as V
from ._backend import call_kernel, register_kernel, resolve_backend
from ._ext import cpu_ext, cuda_ext, dtype_code, new_output, stream_of
from ._library import library_op
from .reference import prune as ref

__all__ = ["magnitude_prune", "random_prune", "RANDOM_PRUNE_PURPOSE"]

RANDOM_PRUNE_PURPOSE = ref.RANDOM_PRUNE_PURPOSE


def magnitude_prune(x: torch.Tensor, density: float, *, backend: str | None = None) -> torch.Tensor:
    """Keep the ``k = floor(density * x.numel())`` entries of largest ``|x|`` and zero the rest.

    Ties at the threshold go to the lowest flat (row-major) index; NaN counts as the largest magnitude.
    Exact, without sorting (radix/histogram select). Returns a new contiguous tensor of x's shape and
    dtype. On tie-free data this equals ``peft.utils.merge_utils.magnitude_based_pruning(x, density)``.

    >>> w = torch.tensor([0.5, -3.0, 1.0, 2.0])
    >>> pyfuse.magnitude_prune(w, 0.5)
    tensor([ 0., -3.,  0.,  2.])
    """
    V.check_float_tensor("x", x)
    density = V.check_fraction("density", density)
    name = resolve_backend(x.device, backend)
    return torch.ops.pyfuse.magnitude_prune(x, ref.keep_count(density, x.numel()), name)


def random_prune(
    x: torch.Tensor, density: float, *, seed: int, rescale: bool = True, backend: str | None = None
) -> torch.Tensor:
    """Keep entry i iff ``u_i < density`` and zero the rest; kept entries are divided by the density
    when ``rescale`` (DARE). ``u_i`` is pyfuse's Philox uniform of counter (flat index i, stream 0,
    purpose ``RANDOM_PRUNE_PURPOSE``) under key ``seed mod 2**64``, so the result is identical on every
    backend. The density is rounded to float32 once; division happens in fp32.

    >>> pyfuse.random_prune(torch.ones(8), 0.5, seed=0)
    tensor([0., 0., 0., 2., 0., 0., 0., 0.])
    """
    V.check_float_tensor("x", x)
    density = V.check_fraction("density", density)
    seed = V.check_seed("seed", seed)
    if not isinstance(rescale, bool):
        raise TypeError(f"rescale must be a bool, got {type(rescale).__name__}")
    name = resolve_backend(x.device, backend)
    return torch.ops.pyfuse.random_prune(x, ref.density_f32(density), V.to_i64(seed), rescale, name)


@library_op("magnitude_prune")
def _magnitude_prune_op(x: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    return call_kernel("magnitude_prune", backend, x, k)


@library_op("random_prune")
def _random_prune_op(x: torch.Tensor, density: float, seed: int, rescale: bool, backend: str) -> torch.Tensor:
    return call_kernel("random_prune", backend, x, density, V.from_i64(seed), rescale)


@_magnitude_prune_op.register_fake
def _(x, k, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_random_prune_op.register_fake
def _(x, density, seed, rescale, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _source_and_out(x: torch.Tensor):
    """(tensor the kernel reads, contiguous output). A strided x is copied into the output, which the
    kernel then prunes in place (kernels allow source == output)."""
    if x.is_contiguous():
        return x, new_output(x.shape, x.dtype, x.device)
    out = x.contiguous()
    return out, out


# ---- reference -------------------------------------------------------------------------------------


@register_kernel("magnitude_prune", "reference")
def _magnitude_reference(x, k):
    return ref.magnitude_prune_topk(x, k)


@register_kernel("random_prune", "reference")
def _random_reference(x, density, seed, rescale):
    return ref.random_prune(x, density, seed, rescale)


# ---- cpu ---------------------------------------------------------------------------------------------


@register_kernel("magnitude_prune", "cpu")
def _magnitude_cpu(x, k):
    src, out = _source_and_out(x)
    cpu_ext().magnitude_prune(src.data_ptr(), out.data_ptr(), x.numel(), dtype_code(x), k)
    return out


@register_kernel("random_prune", "cpu")
def _random_cpu(x, density, seed, rescale):
    src, out = _source_and_out(x)
    cpu_ext().random_prune(src.data_ptr(), out.data_ptr(), x.numel(), dtype_code(x), density, rescale, seed,
                           RANDOM_PRUNE_PURPOSE)
    return out


# ---- triton ------------------------------------------------------------------------------------------


@register_kernel("magnitude_prune", "triton")
def _magnitude_triton(x, k):
    from .kernels import prune as kernels

    src, out = _source_and_out(x)
    return kernels.magnitude_prune(src, out, k) if x.numel() else out


@register_kernel("random_prune", "triton")
def _random_triton(x, density, seed, rescale):
    from .kernels import prune as kernels

    src, out = _source_and_out(x)
    if x.numel():
        lo, hi = V.split_seed(seed)
        kernels.random_prune(src, out, density, lo, hi, rescale, RANDOM_PRUNE_PURPOSE)
    return out


# ---- cuda --------------------------------------------------------------------------------------------


@register_kernel("magnitude_prune", "cuda")
def _magnitude_cuda(x, k):
    ext = cuda_ext()
    src, out = _source_and_out(x)
    workspace = torch.empty(ext.select_workspace_bytes(x.numel()), dtype=torch.uint8, device=x.device)
    ext.magnitude_prune(src.data_ptr(), out.data_ptr(), x.numel(), dtype_code(x), k, workspace.data_ptr(),
                        stream_of(x))
    return out


@register_kernel("random_prune", "cuda")
def _random_cuda(x, density, seed, rescale):
    src, out = _source_and_out(x)
    cuda_ext().random_prune(src.data_ptr(), out.data_ptr(), x.numel(), dtype_code(x), density, rescale, seed,
                            RANDOM_PRUNE_PURPOSE, stream_of(x))
    return out

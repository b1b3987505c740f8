"""``pyfuse.rand``: Philox uniforms, identical on every backend and to Triton's ``tl.rand``.

This module is also the smallest complete example of a pyfuse op: public function (validation, backend
choice) -> ``torch.library`` custom op with a fake -> one registered kernel per backend.
"""
from __future__ import annotations

import torch

from . import _validate as V
from ._backend import call_kernel, register_kernel, resolve_backend
from ._ext import cpu_ext, cuda_ext, new_output, stream_of
from ._library import library_op
from .reference import philox as ref


def rand(numel: int, *, seed: int, offset: int = 0, stream: int = 0, device=None, backend: str | None = None):
    """float32 tensor of ``numel`` uniforms in [0, 1 - 2**-24]; element i uses Philox4x32-10 with
    key = seed mod 2**64 and counter = (offset + i mod 2**64, stream, 0). With stream 0 this equals
    Triton's ``tl.rand(seed, offset + i)``."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    seed = V.check_seed("seed", seed)
    offset = V.check_seed("offset", offset)
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < 1 << 32:
        raise ValueError(f"stream must be an int in [0, 2**32), got {stream!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    name = resolve_backend(device, backend)
    return torch.ops.pyfuse.rand(numel, V.to_i64(seed), V.to_i64(offset), stream, device, name)


@library_op("rand")
def _rand_op(numel: int, seed: int, offset: int, stream: int, device: torch.device, backend: str) -> torch.Tensor:
    return call_kernel("rand", backend, numel, V.from_i64(seed), V.from_i64(offset), stream, device)


@_rand_op.register_fake
def _(numel, seed, offset, stream, device, backend):
    return torch.empty(numel, dtype=torch.float32, device=device)


@register_kernel("rand", "reference")
def _rand_reference(numel, seed, offset, stream, device):
    return ref.rand(numel, seed, offset, stream, device)


@register_kernel("rand", "cpu")
def _rand_cpu(numel, seed, offset, stream, device):
    out = new_output(numel, torch.float32, device)
    cpu_ext().rand_uniform(out.data_ptr(), numel, seed, offset, stream)
    return out


@register_kernel("rand", "cuda")
def _rand_cuda(numel, seed, offset, stream, device):
    out = torch.empty(numel, dtype=torch.float32, device=device)
    cuda_ext().rand_uniform(out.data_ptr(), numel, seed, offset, stream, stream_of(out))
    return out


@register_kernel("rand", "triton")
def _rand_triton(numel, seed, offset, stream, device):
    from .kernels import philox as kernels

    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        lo, hi = V.split_seed(seed)
        kernels.rand(out, lo, hi, V.to_i64(offset), stream)
    return out

"""Loading the compiled extensions, and the small conversions every binding call needs."""
from __future__ import annotations

import functools
import importlib
import math

import torch

from . import _output_cache
from ._backend_error import BackendError

# Must match csrc/include/pyfuse/common.h (enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=None)
def _load(name: str):
    """Returns (module, None) or (None, reason)."""
    try:
        return importlib.import_module(f"pyfuse.{name}"), None
    except ImportError as err:
        return None, f"extension pyfuse.{name} not built or not loadable ({err})"


def cpu_ext():
    mod, reason = _load("_C")
    if mod is None:
        raise BackendError(f"cpu backend unavailable: {reason}")
    return mod


def cuda_ext():
    mod, reason = _load("_C_cuda")
    if mod is None:
        raise BackendError(f"cuda backend unavailable: {reason}")
    return mod


def ext_status(name: str):
    """(module or None, reason or None) without raising."""
    return _load(name)


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"expected a float32, float16 or bfloat16 tensor, got {t.dtype}") from None


# One huge page. Was 8 MiB: union_probs B=8 qwen2+llama3 (a 6 MiB output) then paid fresh pages every call,
# 1.31-1.66 ms in the bench against 1.11-1.23 ms with the output cache.
HUGEPAGE_MIN_BYTES = 2 << 20


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for a kernel's output. Large CPU outputs (>= HUGEPAGE_MIN_BYTES) get transparent huge pages
    before their first touch (page faults of a fresh 64 MiB output cost as much as the kernel here) and come
    from pyfuse's cache of freed output buffers when one of the same size is free (pyfuse/_output_cache.py)."""
    device = torch.device(device)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < HUGEPAGE_MIN_BYTES or _fills_uninitialized_memory():
        return torch.empty(shape, dtype=dtype, device=device)

    def fresh():
        raw = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
        cpu_ext().advise_hugepages(raw.data_ptr(), nbytes)
        return raw.untyped_storage()

    return _output_cache.CACHE.tensor(shape, dtype, nbytes, fresh)


def _fills_uninitialized_memory() -> bool:
    """torch.empty fills new memory (NaN) in deterministic mode: a reused buffer would not be, so no reuse then."""
    fill = getattr(getattr(torch.utils, "deterministic", None), "fill_uninitialized_memory", False)
    return bool(fill) and torch.are_deterministic_algorithms_enabled()


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of t's device, as an integer handle for the CUDA launchers."""
    return torch.cuda.current_stream(t.device).cuda_stream

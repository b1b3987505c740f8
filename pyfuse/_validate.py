"""Argument checks shared by the public functions. They run before any kernel and raise
TypeError/ValueError naming the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, t, *, dtypes=None, ndim=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def check_float_tensor(name: str, t, *, ndim=None) -> torch.Tensor:
    return check_tensor(name, t, dtypes=FLOAT_DTYPES, ndim=ndim)


def check_fraction(name: str, value) -> float:
    """A real number in [0, 1] (densities, probabilities)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_seed(name: str, seed) -> int:
    """An integer seed; reduced mod 2**64 (so -1 == 2**64 - 1, as in Triton)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__}")
    return int(seed) % (1 << 64)


def check_same_device(**tensors) -> torch.device:
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for n, d in devices.items():
        if d != first:
            listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
            raise ValueError(f"all tensors must be on one device; got {listing}")
    return first


def split_seed(seed: int) -> tuple[int, int]:
    """(lo, hi) 32-bit halves of a seed already reduced mod 2**64."""
    return seed & 0xFFFFFFFF, seed >> 32


def to_i64(value: int) -> int:
    """A value in [0, 2**64) as the signed int64 with the same bits (torch op schemas take int64)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def from_i64(value: int) -> int:
    return value % (1 << 64)

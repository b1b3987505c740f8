"""Shared test parametrization and tolerances."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import pyfuse

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (rtol, atol) per input dtype, for results accumulated in fp32 and rounded to the input dtype.
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float64: (1e-12, 1e-12),
}

# Every (backend, device) pair a test may target; the ones that cannot run here are skipped with the reason.
_CANDIDATES = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu"),
               ("reference", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]


def _param(backend: str, device: str):
    status = pyfuse.backends()[backend]
    if device == "cuda" and not torch.cuda.is_available():
        return pytest.param(backend, device, id=f"{backend}-{device}", marks=pytest.mark.skip(reason="no CUDA device"))
    if device == "cpu" and backend == "triton" and not status.usable:
        return pytest.param(backend, device, id=f"{backend}-{device}", marks=pytest.mark.skip(reason=status.reason))
    if not status.usable or device not in status.devices:
        return pytest.param(backend, device, id=f"{backend}-{device}", marks=pytest.mark.skip(reason=status.reason))
    return pytest.param(backend, device, id=f"{backend}-{device}")


BACKEND_DEVICES = [_param(b, d) for b, d in _CANDIDATES]
# Kernels only (no reference): for tests that compare a backend against the reference.
KERNEL_BACKEND_DEVICES = [p for p, (b, _) in zip(BACKEND_DEVICES, _CANDIDATES) if b != "reference"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
    rtol, atol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, check_dtype=True)


def binomial_ok(kept: int, n: int, p: float, z: float = 5.0) -> bool:
    """|kept - n p| <= z sqrt(n p (1 - p)): a kept count consistent with Binomial(n, p) (exact when p is 0 or 1).
    Two-sided false-failure rate about 6e-7 at z = 5, 6e-5 at z = 4."""
    if p in (0.0, 1.0):
        return kept == round(n * p)
    return abs(kept - n * p) <= z * math.sqrt(n * p * (1 - p))


@contextlib.contextmanager
def cpu_avx512_paths(avx512: bool):
    """Runs the block with the CPU's AVX-512 intrinsic paths (magnitude_prune and merge band sweeps, ensemble
    exponential sums) on or off, so that an AVX-512 machine tests the portable paths too. Yields whether
    AVX-512 really runs."""
    from pyfuse._ext import cpu_ext
    ext = cpu_ext()
    previous = ext.set_avx512_paths(avx512)
    try:
        yield avx512 and ext.avx512_paths_usable()
    finally:
        ext.set_avx512_paths(previous)

"""Shared test parametrization and tolerances."""
from __future__ import annotations

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

"""Backend registry and selection.

Order of precedence for the backend of one call: explicit ``backend=`` argument, then
``pyfuse.use_backend(...)``, then the ``PYFUSE_BACKEND`` environment variable, then the device default
(CPU tensors: ``cpu``; CUDA tensors: ``cuda``, or ``triton`` when the CUDA extension is not built).
Asking for a backend that cannot run raises ``BackendError`` with the reason; nothing falls back silently.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Callable

import torch

from ._backend_error import BackendError
from ._ext import ext_status

BACKEND_NAMES = ("reference", "cpu", "cuda", "triton")

# Innermost use_backend(...) last. A plain list (not a ContextVar) because torch.compile cannot trace
# ContextVar.get; resolve_backend is evaluated once at trace time anyway.
_override: list[str | None] = []
_kernels: dict[tuple[str, str], Callable] = {}


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool
    reason: str
    devices: tuple[str, ...]  # device types this backend runs on here

    def __str__(self) -> str:
        return f"{self.name}: {'usable' if self.usable else 'not usable'} ({self.reason})"


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_version():
    try:
        import triton
    except ImportError as err:
        return None, f"triton not installed ({err})"
    return triton.__version__, None


def _status(name: str) -> BackendStatus:
    has_gpu = torch.cuda.is_available()
    if name == "reference":
        return BackendStatus(name, True, "plain torch", ("cpu", "cuda") if has_gpu else ("cpu",))
    if name == "cpu":
        mod, reason = ext_status("_C")
        if mod is None:
            return BackendStatus(name, False, reason, ())
        return BackendStatus(name, True, f"compiled, {mod.omp_max_threads()} OpenMP threads", ("cpu",))
    if name == "cuda":
        mod, reason = ext_status("_C_cuda")
        if mod is None:
            return BackendStatus(name, False, reason, ())
        if mod.device_count() == 0 or not has_gpu:
            return BackendStatus(name, False, "compiled, no CUDA device", ())
        return BackendStatus(name, True, f"compiled, {mod.device_count()} device(s)", ("cuda",))
    if name == "triton":
        version, reason = _triton_version()
        if version is None:
            return BackendStatus(name, False, reason, ())
        if triton_interpreter():
            devices = ("cpu", "cuda") if has_gpu else ("cpu",)
            return BackendStatus(name, True, f"triton {version}, interpreter only (TRITON_INTERPRET=1)", devices)
        if has_gpu:
            return BackendStatus(name, True, f"triton {version}", ("cuda",))
        return BackendStatus(name, False, f"triton {version}, interpreter only: no GPU "
                             "(TRITON_INTERPRET=1 runs it on CPU tensors)", ())
    raise BackendError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it can run here, and why not."""
    return {name: _status(name) for name in BACKEND_NAMES}


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the pyfuse ops inside the block on backend ``name`` (None restores automatic choice)."""
    if name is not None and name not in BACKEND_NAMES:
        raise BackendError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


@torch.compiler.assume_constant_result
def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend that runs an op on ``device``; raises BackendError when it cannot.
    Under torch.compile it runs once at trace time and its answer is baked into the graph."""
    device = torch.device(device)
    name = backend or (_override[-1] if _override else None) or os.environ.get("PYFUSE_BACKEND") or None
    if name is None:
        if device.type == "cpu":
            name = "cpu"
        elif device.type == "cuda":
            name = "cuda" if ext_status("_C_cuda")[0] is not None else "triton"
        else:
            raise BackendError(f"pyfuse has no backend for device type {device.type!r}")
    status = _status(name)
    if not status.usable:
        raise BackendError(f"backend {name!r} cannot run: {status.reason}")
    if device.type not in status.devices:
        raise BackendError(f"backend {name!r} does not run on {device.type} tensors here ({status.reason})")
    return name


def register_kernel(op: str, backend: str):
    """Decorator: ``fn`` implements op ``op`` on ``backend``."""
    if backend not in BACKEND_NAMES:
        raise BackendError(f"unknown backend {backend!r}")

    def deco(fn):
        _kernels[(op, backend)] = fn
        return fn

    return deco


def call_kernel(op: str, backend: str, *args):
    try:
        fn = _kernels[(op, backend)]
    except KeyError:
        have = sorted(b for (o, b) in _kernels if o == op)
        raise BackendError(f"op {op!r} has no {backend!r} kernel (available: {have})") from None
    if backend in ("cuda", "triton"):
        # Kernels launch on the current device: make it the inputs' device (tensors may live on cuda:1).
        device = next((a.device for a in _flat(args) if isinstance(a, torch.Tensor) and a.is_cuda), None)
        if device is not None:
            with torch.cuda.device(device):
                return fn(*args)
    return fn(*args)


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a

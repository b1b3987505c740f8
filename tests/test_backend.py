"""Backend reporting and selection: explicit argument > use_backend > PYFUSE_BACKEND > device default;
an unusable backend raises with its reason."""
import shutil
import subprocess
import sys

import pytest
import torch

import pyfuse
from pyfuse._backend import call_kernel, resolve_backend


def test_backends_report_every_backend_with_reason():
    status = pyfuse.backends()
    assert set(status) == {"reference", "cpu", "cuda", "triton"}
    assert status["reference"].usable and status["cpu"].usable
    for s in status.values():
        assert s.reason
    if not torch.cuda.is_available():
        assert not status["cuda"].usable
        if shutil.which("nvcc"):  # CI builds _C_cuda wherever nvcc exists: it must load, and say why it can't run
            assert status["cuda"].reason == "compiled, no CUDA device"
    else:  # on a GPU machine both GPU backends must run: a broken build must not turn into skipped tests
        assert status["cuda"].usable and status["triton"].usable, (status["cuda"].reason, status["triton"].reason)


def test_selection_precedence(monkeypatch):
    monkeypatch.delenv("PYFUSE_BACKEND", raising=False)
    assert resolve_backend("cpu") == "cpu"
    monkeypatch.setenv("PYFUSE_BACKEND", "reference")
    assert resolve_backend("cpu") == "reference"
    with pyfuse.use_backend("cpu"):
        assert resolve_backend("cpu") == "cpu"
        with pyfuse.use_backend("reference"):
            assert resolve_backend("cpu") == "reference"
        assert resolve_backend("cpu", "reference") == "reference"
    assert resolve_backend("cpu") == "reference"


def test_unusable_backend_raises_with_reason(monkeypatch):
    monkeypatch.delenv("PYFUSE_BACKEND", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(pyfuse.BackendError, match="no CUDA device|not built"):
            pyfuse.rand(4, seed=0, backend="cuda")
    with pytest.raises(pyfuse.BackendError, match="unknown backend"):
        with pyfuse.use_backend("fast"):
            pass
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(pyfuse.BackendError, match="no GPU"):
            resolve_backend("cpu", "triton")
    with pytest.raises(pyfuse.BackendError, match="no backend for device type"):
        resolve_backend("meta")


def test_missing_kernel_is_an_error():
    with pytest.raises(pyfuse.BackendError, match="no 'cpu' kernel"):
        call_kernel("no_such_op", "cpu")


def test_python_m_pyfuse_info_runs():
    proc = subprocess.run([sys.executable, "-m", "pyfuse", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("reference", "cpu", "cuda", "triton"):
        assert name in proc.stdout
    from pyfuse import _C
    expected = "yes" if _C.avx512_paths_usable() else "no: compiler-vectorized loops instead (slower)"
    assert f"hand-written AVX-512 paths (F/BW/VL/DQ): {expected}" in proc.stdout


def test_import_pyfuse_registers_every_op():
    """`import pyfuse` alone defines every torch.ops.pyfuse op (a saved or exported graph names them): importing
    every other pyfuse module afterwards defines none."""
    code = (
        "import importlib, pkgutil, torch, pyfuse\n"
        "from pyfuse import _library\n"
        "at_import = list(_library.DEFINED)\n"
        "for info in pkgutil.walk_packages(pyfuse.__path__, 'pyfuse.'):\n"
        "    if not info.name.startswith(('pyfuse.__main__', 'pyfuse.integrations')):  # runs the CLI; optional peers\n"
        "        importlib.import_module(info.name)\n"
        "assert _library.DEFINED == at_import, sorted(set(_library.DEFINED) - set(at_import))\n"
        "assert all(hasattr(torch.ops.pyfuse, n) for n in at_import)\n"
        "print(len(at_import))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) >= 11  # prune 2, rand, merge, ensemble 3, spec 4

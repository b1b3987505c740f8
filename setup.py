"""Build pyfuse: CMake builds pyfuse._C (always) and pyfuse._C_cuda (when nvcc is found).

Environment: PYFUSE_CUDA=auto|0|1, PYFUSE_CUDA_ARCHS (default "80;90"), PYFUSE_BUILD_DIR (CMake build tree,
default build/cmake), MAX_JOBS (parallel compile jobs). Building needs no torch.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        # setuptools clears self.inplace while building and copies only declared extensions afterwards.
        self._to_source = self.inplace or getattr(self, "editable_mode", False)
        super().run()

    def build_extension(self, ext):
        import pybind11

        ext_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("PYFUSE_BUILD_DIR", ROOT / "build" / "cmake")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("PYFUSE_CUDA", "auto")
        if cuda not in ("auto", "0", "1"):
            raise ValueError(f"PYFUSE_CUDA must be auto, 0 or 1, got {cuda!r}")
        configure = [
            "cmake", str(ROOT), f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPYFUSE_CUDA={cuda}", f"-DPYFUSE_CUDA_ARCHS={os.environ.get('PYFUSE_CUDA_ARCHS', '80;90')}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja"]
        subprocess.run(configure, cwd=build_dir, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)
        if self._to_source:  # _C_cuda rides along with the declared pyfuse._C
            for lib in ext_dir.glob("_C*.so"):
                _replace_atomically(lib, ROOT / "pyfuse" / lib.name)

    def copy_extensions_to_source(self):
        """Done atomically in build_extension instead: overwriting a loaded .so in place crashes the
        processes that have it mapped (e.g. a test run during a rebuild)."""


def _replace_atomically(src: Path, dst: Path):
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


setup(
    packages=find_packages(include=["pyfuse", "pyfuse.*"]) + ["pyfuse.kernels"],
    package_dir={"pyfuse.kernels": "kernels"},
    ext_modules=[CMakeExtension("pyfuse._C")],
    cmdclass={"build_ext": CMakeBuild},
)

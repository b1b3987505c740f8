"""Compile every Triton kernel listed in a ``pyfuse.kernels.*`` module's ``AOT_SPECS`` for sm_80 and sm_90,
without a GPU. Run WITHOUT TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
Usage: python aot_compile.py [module ...]; prints one line per kernel and exits 1 on any failure."""
import importlib
import pkgutil
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import pyfuse.kernels

TARGETS = (80, 90)


def modules():
    return [m.name for m in pkgutil.iter_modules(pyfuse.kernels.__path__)]


def compile_spec(fn, signature, constexprs, cc):
    signature = dict(signature)
    for name in constexprs:
        signature[name] = "constexpr"
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn, signature, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"enable_fp_fusion": False})


def main(names):
    failures = 0
    for name in names or modules():
        module = importlib.import_module(f"pyfuse.kernels.{name}")
        for fn, signature, constexprs in getattr(module, "AOT_SPECS", []):
            for cc in TARGETS:
                label = f"{name}.{fn.fn.__name__} {constexprs} sm_{cc}"
                try:
                    kernel = compile_spec(fn, signature, constexprs, cc)
                    assert "cubin" in kernel.asm, "no cubin produced"
                    print(f"ok   {label}")
                except Exception as err:  # report every kernel, then fail
                    failures += 1
                    print(f"FAIL {label}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

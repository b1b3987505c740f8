"""`pyfuse` command line: `pyfuse bench` (the main command) and `pyfuse info`."""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys


def _versions() -> list[str]:
    import numpy
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError as e:
        triton_version = f"not installed ({e})"
    return [f"python {platform.python_version()}", f"torch {torch.__version__}", f"triton {triton_version}",
            f"numpy {numpy.__version__}"]


def _extensions() -> list[str]:
    from pyfuse._ext import ext_status

    lines = []
    for name in ("_C", "_C_cuda"):
        mod, reason = ext_status(name)
        if mod is None:
            lines.append(f"pyfuse.{name}: {reason}")
            continue
        lines.append(f"pyfuse.{name}: {mod.__file__}")
        if name == "_C":
            lines.append(f"  OpenMP max threads: {mod.omp_max_threads()}")
            lines.append("  runtime dispatch: " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                                            for k, v in mod.cpu_features().items()))
            lines.append("  hand-written AVX-512 paths (F/BW/VL/DQ): " + (
                "yes" if mod.avx512_paths_usable() else "no: compiler-vectorized loops instead (slower)"))
        else:
            v = mod.runtime_version()
            lines.append(f"  CUDA runtime {v // 1000}.{v % 1000 // 10}, {mod.device_count()} device(s)")
    return lines


def _cpu_features() -> str:
    import torch

    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16")
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    have = [w for w in wanted if w in flags] if flags else ["(no /proc/cpuinfo)"]
    return f"{platform.machine()}: {' '.join(have)}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def info_lines() -> list[str]:
    import torch

    from pyfuse import backends

    lines = ["backends:"]
    lines += [f"  {name:<9} {'usable' if s.usable else 'not usable':<10}  {s.reason}" for name, s in backends().items()]
    lines += ["versions: " + ", ".join(_versions()), "extensions:"]
    lines += ["  " + line for line in _extensions()]
    lines.append(f"CPU: {_cpu_features()}; {torch.get_num_threads()} torch threads")
    from pyfuse import _output_cache

    cache = _output_cache.CACHE
    lines.append(f"output cache (large CPU outputs reuse freed buffers): limit {cache.limit_bytes / 2**20:g} MiB, "
                 f"holding {cache.held_bytes() / 2**20:g} MiB" + ("" if _output_cache.reuse_supported() else
                                                            "; off: this torch has no storage use count"))
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        lines.append("GPU: none visible to torch")
    return lines


@contextlib.contextmanager
def _progress():
    """Yields `step(text)`: a rich spinner on a terminal, else one plain stderr line per step."""
    try:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    except ImportError:
        Progress = None
    if Progress is None or not sys.stderr.isatty():
        yield lambda text: print(f"[pyfuse bench] {text}", file=sys.stderr, flush=True)
        return
    columns = (SpinnerColumn(), TimeElapsedColumn(), TextColumn("step {task.completed}"),
               TextColumn("{task.description}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("starting", total=None)

        def step(text: str) -> None:
            progress.update(task, description=text, advance=1)

        yield step


def _bench(args) -> int:
    import torch

    from pyfuse.bench import report as rep
    from pyfuse.bench.registry import discover, families
    from pyfuse.bench.runner import run

    if args.plot and rep.matplotlib_missing():
        print(f"pyfuse bench: {rep.matplotlib_missing()}", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError as e:
        print(f"pyfuse bench: bad --device {args.device!r}: {e}", file=sys.stderr)
        return 2
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        print("pyfuse bench: --device cuda given but torch sees no CUDA device", file=sys.stderr)
        return 2
    discover()
    if args.family is not None and args.family not in families():
        print(f"pyfuse bench: unknown family {args.family!r}; known: {', '.join(families())}", file=sys.stderr)
        return 2
    with _progress() as step:
        result = run(device, args.quick, args.family, args.filter, step)
    rep.print_table(result)
    if args.json:
        rep.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        rep.write_plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _info(args) -> int:
    print("\n".join(info_lines()))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyfuse", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time every op for each provider (reference, pyfuse backends, peers)")
    b.add_argument("--quick", action="store_true", help="smoke run: small shapes, short time budget")
    b.add_argument("--family", help="only this family (prune, merge, spec, ensemble, philox, ...)")
    b.add_argument("--filter", help="only cases whose name contains this substring")
    b.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="also plot effective GB/s per case (needs matplotlib)")
    b.set_defaults(func=_bench)
    i = sub.add_parser("info", help="backends, versions, extension build and CPU features")
    i.set_defaults(func=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


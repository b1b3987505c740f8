"""Presenting a `BenchReport`: table (rich when installed, else plain text), JSON, and a matplotlib plot."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import defaultdict
from typing import TextIO

from pyfuse.bench.runner import BenchReport, Result

COLUMNS = ("case", "provider", "median", "reps", "GB/s", "% copy", "x floor", "peak extra", "speed-up vs peers")


def _time(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _speedup(r: Result) -> str:
    return ", ".join(f"{ratio:.3g}x vs {peer}" for peer, ratio in r.speedup.items())


def rows(report: BenchReport) -> list[tuple[str, ...]]:
    """One row of strings per result, in COLUMNS order; the case name only on a case's first row."""
    out, last = [], None
    for r in report.results:
        out.append((r.case if r.case != last else "", r.provider, _time(r.median_s), str(r.reps), f"{r.gbps:.3g}",
                    f"{r.pct_copy:.3g}%", f"{r.floor_multiple:.3g}x", _mib(r.peak_extra_bytes), _speedup(r)))
        last = r.case
    return out


def header(report: BenchReport) -> list[str]:
    m, c = report.machine, report.copy
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    return [
        f"pyfuse bench{' --quick' if report.quick else ''} on {report.device}: {m['cpu']} ({m['cpu_count']} CPUs, "
        f"{m['torch_threads']} torch threads){gpu}; torch {m['torch']}, python {m['python']}",
        f"copy bandwidth (read + write, {c['bytes'] >> 20} MiB moved): median {c['median_gbps']:.3g} GB/s, "
        f"best {c['best_gbps']:.3g} GB/s; '% copy' = effective GB/s (bytes_floor / median) / median copy GB/s; "
        f"'x floor' = median / (bytes_floor / median copy GB/s)",
        f"peak extra memory: {report.memory_method}",
        f"pyfuse output cache (CPU): {m.get('output_cache_mib', 0):g} MiB (large CPU outputs reuse freed buffers; "
        f"peers do not; PYFUSE_OUTPUT_CACHE_MB=0 turns it off)",
    ]


def skipped_lines(report: BenchReport) -> list[str]:
    """Skipped and failed providers grouped by (provider, reason), with the cases they concern."""
    groups: dict[tuple[bool, str, str], list[str]] = defaultdict(list)
    for s in report.skipped:
        groups[(s.failed, s.provider, s.reason)].append(s.case)
    lines = []
    for (failed, provider, reason), cases in sorted(groups.items()):
        where = cases[0] if len(cases) == 1 else f"{len(cases)} cases"
        lines.append(f"{'FAILED' if failed else 'skipped'} {provider} ({where}): {reason}")
    return lines


def print_table(report: BenchReport, file: TextIO | None = None) -> None:
    file = file or sys.stdout
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        _print_plain(report, file)
        return
    console = Console(file=file, width=max(160, Console(file=file).width))
    for line in header(report):
        console.print(line, highlight=False, markup=False)
    table = Table(*COLUMNS)
    for row in rows(report):
        if row[0]:
            table.add_section()
        table.add_row(*map(escape, row))  # case names contain [brackets]
    console.print(table)
    for line in skipped_lines(report):
        console.print(line, highlight=False, markup=False)
    console.print(f"{len(report.results)} results in {report.elapsed_s:.1f} s", highlight=False)


def _print_plain(report: BenchReport, file: TextIO) -> None:
    table = [COLUMNS, *rows(report)]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for line in header(report):
        print(line, file=file)
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), file=file)
    for line in skipped_lines(report):
        print(line, file=file)
    print(f"{len(report.results)} results in {report.elapsed_s:.1f} s", file=file)


def write_json(report: BenchReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(report), f, indent=2)


def matplotlib_missing() -> str:
    """'' when --plot can work, else the message telling how to get it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib, which is not installed: pip install 'pyfuse[bench]' (or matplotlib)"
    return ""


def write_plot(report: BenchReport, path: str) -> None:
    """One panel per case: effective GB/s of each provider (log scale), the copy bandwidth as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_case: dict[str, list[Result]] = defaultdict(list)
    for r in report.results:
        by_case[r.case].append(r)
    ncols = min(3, max(1, len(by_case)))
    nrows = max(1, -(-len(by_case) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 0.5 + 2.2 * nrows), squeeze=False)
    copy_gbps = report.copy["median_gbps"]
    for ax, (case, results) in zip(axes.flat, by_case.items()):
        ax.barh([r.provider for r in results], [r.gbps for r in results],
                color=["tab:orange" if r.provider.startswith("pyfuse:") else "tab:gray" for r in results])
        ax.axvline(copy_gbps, linestyle="--", color="black", linewidth=1)
        ax.set_xscale("log")
        ax.set_title(case, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("effective GB/s (dashed: copy bandwidth)", fontsize=7)
    for ax in list(axes.flat)[len(by_case):]:
        ax.set_visible(False)
    fig.suptitle(f"pyfuse bench on {report.device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

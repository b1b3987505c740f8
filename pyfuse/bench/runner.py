"""Runs the registered cases for every provider and collects one `BenchReport`."""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pyfuse import _output_cache
from pyfuse._backend_error import BackendError
from pyfuse.bench import measure
from pyfuse.bench.registry import BenchCase, discover, generators, select

# Per-provider timing budget in seconds, and the minimum number of timed calls.
FULL = {"budget_s": 0.5, "min_reps": 5}
QUICK = {"budget_s": 0.05, "min_reps": 3}


@dataclass(frozen=True)
class Result:
    case: str  # BenchCase.name
    family: str
    op: str
    params: str
    provider: str
    median_s: float
    min_s: float
    reps: int
    gbps: float
    pct_copy: float
    floor_multiple: float  # median / the time bytes_floor takes at the copy bandwidth (1 = at the floor)
    peak_extra_bytes: int | None
    speedup: dict[str, float]  # peer -> peer time / this time; pyfuse providers only


@dataclass(frozen=True)
class Skip:
    case: str  # case name, or a case module / family when the whole generator failed
    provider: str
    reason: str
    failed: bool = False  # True: it raised; False: it cannot run here


@dataclass
class BenchReport:
    device: str
    quick: bool
    machine: dict
    copy: dict
    memory_method: str
    results: list[Result] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    elapsed_s: float = 0.0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine_info(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # pyfuse's large CPU outputs reuse freed buffers (pyfuse/_output_cache.py); the peers use torch's allocator
        "output_cache_mib": _output_cache.CACHE.limit_bytes / (1 << 20) if _output_cache.reuse_supported() else 0,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run_case(case: BenchCase, device, settings: dict, copy_gbps: float, report: BenchReport, step) -> None:
    for provider, reason in case.skipped.items():
        report.skipped.append(Skip(case.name, provider, reason))
    step(f"{case.name} ({', '.join(case.providers)})")
    timings, errors = measure.time_interleaved(case.providers, device, memory=True, **settings)
    for provider, e in errors.items():
        if isinstance(e, BackendError):  # op has no kernel for this backend
            report.skipped.append(Skip(case.name, provider, str(e)))
        else:  # reported, so one broken provider does not hide the others
            report.skipped.append(Skip(case.name, provider, f"{type(e).__name__}: {e}", failed=True))
    for provider, t in timings.items():
        gbps = case.bytes_floor / t.median_s / 1e9
        speedup = {}
        if provider.startswith("pyfuse:"):
            speedup = {p: timings[p].median_s / t.median_s for p in case.peers if p in timings}
        report.results.append(
            Result(case.name, case.family, case.op, case.params, provider, t.median_s, t.min_s, t.reps, gbps,
                   100.0 * gbps / copy_gbps, copy_gbps / gbps if gbps > 0 else math.inf, t.peak_extra_bytes,
                   speedup)
        )


def run(device=None, quick: bool = False, family: str | None = None, filter: str | None = None,
        step: Callable[[str], None] = lambda text: None) -> BenchReport:
    """Time every selected case on `device` (default: CUDA if present, else CPU); `step` reports progress."""
    start = time.perf_counter()
    device = torch.device(device) if device is not None else default_device()
    settings = QUICK if quick else FULL
    step("copy bandwidth")
    copy = measure.copy_bandwidth(device)
    if device.type == "cuda":
        method = measure.MEMORY_METHOD_CUDA
    else:
        method = measure.cpu_peak_supported() or measure.MEMORY_METHOD_CPU
    report = BenchReport(str(device), quick, machine_info(device), copy, method)
    for module, error in discover().items():
        report.skipped.append(Skip(module, "*", f"case module failed to import: {error}", failed=True))
    for fam, gen in generators(family):
        cases = select(gen(device, quick), filter)
        while True:
            try:
                case = next(cases)
            except StopIteration:
                break
            except Exception as e:  # a generator that raises ends its own cases only
                report.skipped.append(Skip(fam, "*", f"case generator failed: {type(e).__name__}: {e}", True))
                break
            _run_case(case, device, settings, copy["median_gbps"], report, step)
            del case  # free this case's inputs before the next one allocates
    report.elapsed_s = time.perf_counter() - start
    return report

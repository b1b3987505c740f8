"""Timing, copy bandwidth and peak extra memory of one provider call."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

MEMORY_METHOD_CPU = (
    "peak RSS during one call (VmHWM after resetting it via /proc/self/clear_refs) minus RSS right after the "
    "call with its output still alive; glibc's mmap threshold is pinned at 128 KiB so freed temporaries "
    "leave the RSS; 2 MiB granularity (huge pages)"
)
MEMORY_METHOD_CUDA = (
    "torch.cuda.max_memory_allocated during one call minus memory_allocated right after it with the output "
    "still alive (caching allocator only)"
)


# From this call time on, memory is measured during a timed call (reading /proc costs ~0.1 ms, < 1%)
# instead of during one more call: slow peers are what makes a run long.
SLOW_S = 0.01


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    reps: int
    peak_extra_bytes: int | None = None  # None: not asked for, or not measurable here
    times: tuple = ()  # every timed call, in seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_call(fn: Callable[[], object], device, budget_s: float, min_reps: int = 5, max_reps: int = 1000,
              memory: bool = False, warm_up: bool = True) -> Timing:
    """Warm up once (unless `warm_up` is False), then time calls until `budget_s` is spent (at least `min_reps`
    unless slow), median.

    A call slower than the budget is still timed, but stops the loop at twice the budget, so slow peers
    cost a few calls rather than `min_reps` of them. `memory=True` also measures `peak_extra_bytes`.
    """
    device = torch.device(device)
    # Memory is measured during the first timed call for slow calls and without a warm-up, else in one more call.
    memory_in_timed_call = True
    if warm_up:
        t0 = time.perf_counter()
        fn()  # lazy init, torch.compile, allocator and caches
        _sync(device)
        memory_in_timed_call = time.perf_counter() - t0 >= SLOW_S
    peak, times = None, []
    if memory and memory_in_timed_call:
        peak, t = _peak_and_time(fn, device)
        times.append(t)
    spent = sum(times)
    while len(times) < max_reps:
        if times and spent >= budget_s and (len(times) >= min_reps or spent >= 2 * budget_s):
            break
        times.append(_timed(fn, device))
        spent += times[-1]
    if memory and not memory_in_timed_call:
        peak, _ = _peak_and_time(fn, device)
    return Timing(statistics.median(times), min(times), len(times), peak, tuple(times))


def time_interleaved(fns: dict[str, Callable[[], object]], device, budget_s: float, min_reps: int = 5,
                     rounds: int = 3, memory: bool = False) -> tuple[dict[str, Timing], dict[str, Exception]]:
    """Times several providers of one case in `rounds` alternating rounds (A B C, A B C, ...), each round with
    1/rounds of the budget and of min_reps, and takes each provider's median over all its calls: on a shared,
    noisy machine a burst of load then slows every provider's calls alike instead of one provider's whole
    budget (one case's speed-up moved by up to 1.5x between runs on the 2-core reference VM). Memory is
    measured in the first round.
    Returns the timings and, per provider that raised, its exception (that provider is dropped)."""
    times: dict[str, list] = {}
    peaks: dict[str, int | None] = {}
    errors: dict[str, Exception] = {}
    reps = -(-min_reps // rounds)
    for r in range(rounds):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                t = time_call(fn, device, budget_s / rounds, reps, memory=memory and r == 0, warm_up=r == 0)
            except Exception as e:  # noqa: BLE001 - handed back to the caller, which reports it
                errors[name] = e
                times.pop(name, None)
                continue
            times.setdefault(name, []).extend(t.times)
            if r == 0:
                peaks[name] = t.peak_extra_bytes
    timings = {name: Timing(statistics.median(ts), min(ts), len(ts), peaks[name], tuple(ts))
               for name, ts in times.items()}
    return timings, errors


def copy_bandwidth(device, nbytes: int = 256 << 20, reps: int = 7) -> dict:
    """GB/s of `dst.copy_(src)` counting read + write bytes; median and best of `reps` after a warm-up."""
    device = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), device, budget_s=math.inf, min_reps=reps, max_reps=reps)
    moved = 2 * src.numel() * src.element_size()
    return {
        "bytes": moved,
        "median_gbps": moved / timing.median_s / 1e9,
        "best_gbps": moved / timing.min_s / 1e9,
        "reps": timing.reps,
    }


_MALLOC_PINNED = False


def _pin_malloc_mmap_threshold() -> None:
    """Make glibc serve blocks >= 128 KiB by mmap and unmap them on free (no dynamic threshold growth)."""
    global _MALLOC_PINNED
    if _MALLOC_PINNED:
        return
    _MALLOC_PINNED = True
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        M_MMAP_THRESHOLD = -3
        libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if m is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(m.group(1)) * 1024


def cpu_peak_supported() -> str:
    """'' when the CPU method works here, else why not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_bytes("VmHWM")
        return ""
    except OSError as e:
        return f"peak RSS cannot be reset here ({e})"


def peak_extra_bytes(fn: Callable[[], object], device) -> int | None:
    """Memory a call needs beyond its inputs and its output (see MEMORY_METHOD_*); None when unmeasurable."""
    return _peak_and_time(fn, torch.device(device))[0]


def _peak_and_time(fn: Callable[[], object], device: torch.device) -> tuple[int | None, float]:
    """Peak extra bytes of one call (None when unmeasurable) and its wall time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        t = time.perf_counter() - t0
        extra = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
        del out
        return max(extra, 0), t
    if cpu_peak_supported():
        t0 = time.perf_counter()
        fn()
        return None, time.perf_counter() - t0
    _pin_malloc_mmap_threshold()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    t0 = time.perf_counter()
    out = fn()
    t = time.perf_counter() - t0
    extra = _proc_status_bytes("VmHWM") - _proc_status_bytes("VmRSS")
    del out
    return max(extra, 0), t

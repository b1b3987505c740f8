"""Reuse of freed large CPU output buffers.

Why: torch's CPU allocator hands every large tensor fresh pages from the kernel (glibc mmaps blocks over 32 MiB
and unmaps them on free), and the kernel zeroes each page on its first touch. For an op called in a loop with
a large output (``union_probs`` at B=64 writes 49 MB a step) that zeroing is a second full write of the output:
measured on the 2-core dev VM, union_probs B=64 qwen2+llama3 takes 15.5-20 ms into a reused buffer against
19.7-31 ms into a fresh one (min of 20 calls, three alternating runs). Like torch's CUDA caching allocator,
pyfuse therefore keeps the storages of its large CPU outputs, up to a byte limit, and hands one to the next
output of the same size once nothing else references it.

Safety: a storage is reused only when this cache holds its only reference (torch's storage use count is 1), so
no tensor, view, numpy array or DLPack capsule of an earlier output can still see the memory, and only when it
was not moved to shared memory (another process may map it). A reused buffer
holds an earlier output's values, as torch.empty may: every kernel writes its whole output.

Control: ``PYFUSE_OUTPUT_CACHE_MB`` (default 256; 0 turns reuse off) at import, ``pyfuse.set_output_cache_limit``
and ``pyfuse.empty_output_cache`` at run time. Memory held here is not returned to the system until evicted.
"""
from __future__ import annotations

import os
import threading

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)  # None: reuse off (never unsafe)


def reuse_supported() -> bool:
    """Whether this torch exposes the storage use count reuse depends on (without it nothing is reused)."""
    return _use_count is not None


class OutputCache:
    """Storages of the most recent large CPU outputs, least recently used first, at most limit_bytes in all
    (entries still in use count too: the bytes held once every output is freed never exceed the limit)."""

    def __init__(self, limit_bytes: int):
        self._lock = threading.Lock()
        self._entries: list[torch.UntypedStorage] = []
        self.limit_bytes = limit_bytes
        self.hits = 0

    def _free(self, s: torch.UntypedStorage) -> bool:
        # A storage moved to shared memory (share_memory_, torch.multiprocessing) may still be mapped by another
        # process: never reused.
        return _use_count(s._cdata) == 1 and not s.is_shared()

    def held_bytes(self) -> int:
        return sum(s.nbytes() for s in self._entries)

    def storage(self, nbytes: int, fresh) -> torch.UntypedStorage:
        """A storage of exactly nbytes: a free cached one, else fresh() (kept when the limit allows)."""
        with self._lock:
            if _use_count is None or nbytes > self.limit_bytes:
                return fresh()
            for i, s in enumerate(self._entries):
                if s.nbytes() == nbytes and self._free(s):
                    self._entries.append(self._entries.pop(i))  # most recently used last
                    self.hits += 1
                    return s
            # Make room by forgetting the oldest entries, in use or not (a tensor using one keeps it alive; it
            # is then freed as any tensor's memory): a loop reuses its most recent outputs.
            held = self.held_bytes()
            while self._entries and held + nbytes > self.limit_bytes:
                held -= self._entries.pop(0).nbytes()
            s = fresh()
            if held + nbytes <= self.limit_bytes:
                self._entries.append(s)
            return s

    def clear(self) -> None:
        """Drops every cached storage (those still in use stay alive with their tensors)."""
        with self._lock:
            self._entries.clear()


def _limit_from_env() -> int:
    text = os.environ.get("PYFUSE_OUTPUT_CACHE_MB", "256")
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"PYFUSE_OUTPUT_CACHE_MB must be a number of MiB, got {text!r}") from None
    if mb < 0:
        raise ValueError(f"PYFUSE_OUTPUT_CACHE_MB must be >= 0, got {text!r}")
    return int(mb * (1 << 20))


CACHE = OutputCache(_limit_from_env())


def set_output_cache_limit(limit_bytes: int) -> None:
    """Caps the bytes pyfuse keeps for reusing large CPU outputs (0 turns reuse off and drops the cache)."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be an int >= 0, got {limit_bytes!r}")
    CACHE.limit_bytes = limit_bytes
    if limit_bytes == 0:
        CACHE.clear()


def empty_output_cache() -> None:
    """Releases the cached output buffers that no tensor uses any more (torch.cuda.empty_cache's CPU twin)."""
    CACHE.clear()

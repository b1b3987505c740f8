"""Reuse of freed large CPU output buffers.

Why: torch's CPU allocator gives large tensors memory from glibc, which maps fresh pages for blocks above its
mmap threshold (128 KiB, rising to at most 32 MiB after frees) and returns them on free; the kernel zeroes each
fresh page on first touch. For an op called in a loop with a large output (``union_probs`` at B=64 writes 49 MB
a step) that zeroing is a second full write of the output: on the 2-core dev VM union_probs B=64 qwen2+llama3
took 14.4-16.4 ms into a reused buffer against 19.6-27.0 ms into a fresh one (min of 30 calls, 5 alternating
runs; docs/developing.md). Like torch's CUDA caching allocator, pyfuse keeps the buffers of its most recent
large CPU outputs, up to a byte limit, and hands one to the next output of the same byte size once no object
can reach the earlier output's memory.

How that is known: each kept buffer is a private storage. An output does not share it: the output is
``torch.from_dlpack`` of a tensor over it, so it has a storage of its own whose DLPack capsule holds a
reference to the private one for as long as anything (the tensor, a view, ``out.untyped_storage()``, a numpy
array, a DLPack capsule, autograd) keeps the output's storage alive. The private storage's use count (torch's
``_storage_Use_Count``) is then 1 exactly when only this cache holds it. (``share_memory_`` on an output copies
it into shared memory and releases the private buffer.) Outputs are built under the cache's lock, so two
threads never get one buffer. Consequence: the storage of an output from the cache cannot be resized: growing
it by ``out.resize_``, releasing it by ``out.untyped_storage().resize_(0)`` or an ``out=`` op that must grow it
raise "storage that is not resizable" (``clone()`` first); shrinking the tensor by ``resize_`` works.

A reused buffer holds an earlier output's values, as torch.empty may: every kernel writes its whole output
(tests/test_output_cache.py fills freed buffers with NaN to check).

Control: ``PYFUSE_OUTPUT_CACHE_MB`` (default 256; 0 turns reuse off) at import, ``pyfuse.set_output_cache_limit``
and ``pyfuse.empty_output_cache`` at run time. Memory held here is not returned to the system until evicted.
"""
from __future__ import annotations

import math
import os
import threading

import torch

_use_count = getattr(torch._C, "_storage_Use_Count", None)  # None: reuse off (never unsafe)


def reuse_supported() -> bool:
    """Whether this torch exposes the storage use count reuse depends on (without it nothing is reused)."""
    return _use_count is not None


class OutputCache:
    """Private storages of the most recent large CPU outputs, least recently used first, at most limit_bytes in
    all (entries still in use count too: the bytes held once every output is freed never exceed the limit)."""

    def __init__(self, limit_bytes: int):
        self._lock = threading.Lock()
        self._entries: list[torch.UntypedStorage] = []
        self.limit_bytes = limit_bytes
        self.hits = 0

    @staticmethod
    def _free(s: torch.UntypedStorage) -> bool:
        return _use_count(s._cdata) == 1

    def _held(self) -> int:
        return sum(s.nbytes() for s in self._entries)

    def _trim(self, limit: int) -> None:
        """Forgets the oldest entries, in use or not, until at most `limit` bytes are held (an output using one
        keeps its memory alive; it is then freed as any tensor's memory)."""
        held = self._held()
        while self._entries and held > limit:
            held -= self._entries.pop(0).nbytes()

    def held_bytes(self) -> int:
        with self._lock:
            return self._held()

    def set_limit(self, limit_bytes: int) -> None:
        with self._lock:
            self.limit_bytes = limit_bytes
            self._trim(limit_bytes)

    def clear(self) -> None:
        """Drops every cached buffer (those still in use stay alive with their outputs)."""
        with self._lock:
            self._entries.clear()

    def tensor(self, shape: tuple, dtype: torch.dtype, nbytes: int, fresh) -> torch.Tensor:
        """A CPU tensor of `shape` and `dtype` (nbytes bytes) over a free cached buffer, else over fresh()
        (an UntypedStorage of nbytes), which is kept when the limit allows."""
        with self._lock:
            if _use_count is None or nbytes > self.limit_bytes:
                return torch.empty(0, dtype=dtype, device="cpu").set_(fresh(), 0, shape)
            for i, s in enumerate(self._entries):
                if s.nbytes() == nbytes and self._free(s):
                    self._entries.append(self._entries.pop(i))  # most recently used last
                    self.hits += 1
                    break
            else:
                self._trim(self.limit_bytes - nbytes)
                s = fresh()
                self._entries.append(s)
            # Built under the lock: the use count of s rises before another thread looks at it.
            return torch.from_dlpack(torch.empty(0, dtype=dtype, device="cpu").set_(s, 0, shape))


def _limit_from_env() -> int:
    text = os.environ.get("PYFUSE_OUTPUT_CACHE_MB", "256")
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"PYFUSE_OUTPUT_CACHE_MB must be a number of MiB, got {text!r}") from None
    if not (math.isfinite(mb) and mb >= 0):
        raise ValueError(f"PYFUSE_OUTPUT_CACHE_MB must be >= 0, got {text!r}")
    return int(mb * (1 << 20))


CACHE = OutputCache(_limit_from_env())


def set_output_cache_limit(limit_bytes: int) -> None:
    """Caps the bytes pyfuse keeps for reusing large CPU outputs, forgetting the oldest buffers beyond it (0 turns
    reuse off)."""
    if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes < 0:
        raise ValueError(f"limit_bytes must be an int >= 0, got {limit_bytes!r}")
    CACHE.set_limit(limit_bytes)


def empty_output_cache() -> None:
    """Releases the cached output buffers that no output uses any more (torch.cuda.empty_cache's CPU twin)."""
    CACHE.clear()

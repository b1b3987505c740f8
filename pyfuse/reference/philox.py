"""Philox4x32-10 as in Triton's ``tl.randint4x`` / ``tl.rand``, in torch (reference backend) and numpy
(independent oracle for the tests). Key = seed mod 2**64 split (lo, hi); counter = (index lo, index hi,
stream, purpose). Two layouts of a stream: element i takes word 0 of counter i (``rand_*``, tl.rand), or word
i % 4 of counter i // 4 (``packed_rand_*``, tl.rand4x; the merge masks). See csrc/include/pyfuse/philox.h for
the C++/CUDA version."""
from __future__ import annotations

import numpy as np
import torch

KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
MASK32 = 0xFFFFFFFF
UNIFORM_SCALE = float.fromhex("0x1.fffffep-32")


def philox_np(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox on uint32 numpy arrays (broadcast); returns four uint32 arrays."""
    c = [np.asarray(v, dtype=np.uint64) & MASK32 for v in (c0, c1, c2, c3)]
    k0 = np.uint64(int(k0) & MASK32)
    k1 = np.uint64(int(k1) & MASK32)
    ra, rb = np.uint64(ROUND_A), np.uint64(ROUND_B)
    m = np.uint64(MASK32)
    for _ in range(rounds):
        pb = rb * c[2]
        pa = ra * c[0]
        c = [((pb >> np.uint64(32)) ^ c[1] ^ k0) & m, pb & m, ((pa >> np.uint64(32)) ^ c[3] ^ k1) & m, pa & m]
        k0 = (k0 + np.uint64(KEY_A)) & m
        k1 = (k1 + np.uint64(KEY_B)) & m
    return [v.astype(np.uint32) for v in c]


def uint_to_uniform_np(x: np.ndarray) -> np.ndarray:
    s = x.astype(np.uint32).view(np.int32)
    s = np.where(s < 0, ~s, s)
    return s.astype(np.float32) * np.float32(UNIFORM_SCALE)


def _block_np(seed: int, counter: np.ndarray, stream: int, purpose: int):
    """The four words of pyfuse's Philox block (counter lo, counter hi, stream, purpose), uint64 counters."""
    seed %= 1 << 64
    return philox_np(counter & np.uint64(MASK32), counter >> np.uint64(32), stream, purpose, seed & MASK32, seed >> 32)


def rand_np(seed: int, index, stream: int = 0, purpose: int = 0) -> np.ndarray:
    return uint_to_uniform_np(_block_np(seed, np.asarray(index, dtype=np.uint64), stream, purpose)[0])


def packed_rand_np(seed: int, index, stream: int = 0, purpose: int = 0) -> np.ndarray:
    """Packed layout: element i is word i % 4 of counter i // 4."""
    index = np.asarray(index, dtype=np.uint64)
    words = _block_np(seed, index >> np.uint64(2), stream, purpose)
    return uint_to_uniform_np(np.choose((index & np.uint64(3)).astype(np.int64), words))


def philox_torch(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox on int64 tensors holding uint32 values. int64 products wrap mod 2**64, so the low 64
    bits of a 32x32 product are exact and the high word is (p >> 32) & MASK32."""
    c = [t.to(torch.int64) & MASK32 for t in (c0, c1, c2, c3)]
    k0, k1 = k0 & MASK32, k1 & MASK32
    for _ in range(rounds):
        pb = c[2] * ROUND_B
        pa = c[0] * ROUND_A
        c = [((pb >> 32) & MASK32) ^ c[1] ^ k0, pb & MASK32, ((pa >> 32) & MASK32) ^ c[3] ^ k1, pa & MASK32]
        k0 = (k0 + KEY_A) & MASK32
        k1 = (k1 + KEY_B) & MASK32
    return c


def uint_to_uniform_torch(x: torch.Tensor) -> torch.Tensor:
    s = torch.where(x >= 1 << 31, x - (1 << 32), x)  # as int32
    s = torch.where(s < 0, -s - 1, s)  # ~s
    return s.to(torch.float32) * UNIFORM_SCALE


def _block_torch(seed: int, counter: torch.Tensor, stream, purpose) -> list[torch.Tensor]:
    """The four words of pyfuse's Philox block (counter lo, counter hi, stream, purpose); int64 counters hold
    uint64 bits, stream/purpose ints or tensors."""
    seed %= 1 << 64
    lo, hi = counter & MASK32, (counter >> 32) & MASK32
    stream = torch.as_tensor(stream, dtype=torch.int64, device=counter.device)
    purpose = torch.as_tensor(purpose, dtype=torch.int64, device=counter.device)
    return philox_torch(lo, hi, stream.expand_as(lo), purpose.expand_as(lo), seed & MASK32, seed >> 32)


def rand_torch(seed: int, index: torch.Tensor, stream=0, purpose=0) -> torch.Tensor:
    """Uniforms in [0, 1) for int64 ``index`` (may be any shape); stream/purpose ints or tensors."""
    return uint_to_uniform_torch(_block_torch(seed, index.to(torch.int64), stream, purpose)[0])


def packed_rand_torch(seed: int, index: torch.Tensor, stream=0, purpose=0) -> torch.Tensor:
    """rand_torch in the packed layout: element i is word i % 4 of counter (i // 4, stream, purpose)."""
    index = index.to(torch.int64)
    words = torch.stack(_block_torch(seed, index >> 2, stream, purpose))  # index >= 0
    return uint_to_uniform_torch(words.gather(0, (index & 3).unsqueeze(0)).squeeze(0))


def rand(numel: int, seed: int, offset: int = 0, stream: int = 0, device=None) -> torch.Tensor:
    """Reference for ``pyfuse.rand``: element i is the uniform of counter (offset + i, stream, 0)."""
    index = torch.arange(numel, dtype=torch.int64, device=device) + offset
    return rand_torch(seed, index, stream, 0)

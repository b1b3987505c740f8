"""Philox4x32-10 in Triton, pinned in our own code so that a Triton upgrade cannot change the stream.
Bit-identical to ``tl.randint4x`` / ``tl.rand`` for counter (c0, c1, 0, 0), and to
csrc/include/pyfuse/philox.h and pyfuse.reference.philox for any counter.

Launch kernels that use it with ``enable_fp_fusion=False`` whenever a uniform meets arithmetic before a
comparison (see docs/developing.md)."""
import triton
import triton.language as tl

KEY_A: tl.constexpr = tl.constexpr(0x9E3779B9)
KEY_B: tl.constexpr = tl.constexpr(0xBB67AE85)
ROUND_A: tl.constexpr = tl.constexpr(0xD2511F53)
ROUND_B: tl.constexpr = tl.constexpr(0xCD9E8D57)
UNIFORM_SCALE: tl.constexpr = tl.constexpr(4.6566127342e-10)  # fp32 0x1.fffffep-32


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1, N_ROUNDS: tl.constexpr = 10):
    """All arguments uint32 (tensors or scalars); returns the four uint32 output words."""
    for _ in tl.static_range(N_ROUNDS):
        p0 = c0
        p2 = c2
        c0 = tl.umulhi(p2, ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(p0, ROUND_A) ^ c3 ^ k1
        c1 = p2 * ROUND_B
        c3 = p0 * ROUND_A
        k0 = k0 + KEY_A
        k1 = k1 + KEY_B
    return c0, c1, c2, c3


@triton.jit
def _block(seed_lo, seed_hi, counter, stream, purpose):
    """The four words of pyfuse's Philox block (counter lo, counter hi, stream, purpose) for uint64 ``counter``."""
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    c2 = (zero + stream).to(tl.uint32)
    c3 = (zero + purpose).to(tl.uint32)
    return philox4x32(c0, c1, c2, c3, seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))


@triton.jit
def philox_randint(seed_lo, seed_hi, index, stream, purpose):
    """First Philox word for int64 ``index`` (tensor), uint32 halves of the seed, int stream/purpose."""
    w0, _, _, _ = _block(seed_lo, seed_hi, index.to(tl.uint64, bitcast=True), stream, purpose)
    return w0


@triton.jit
def philox_packed_randint(seed_lo, seed_hi, index, stream, purpose):
    """The packed layout: word index % 4 of counter (index // 4, stream, purpose), for int64 ``index`` >= 0."""
    idx = index.to(tl.uint64, bitcast=True)
    w0, w1, w2, w3 = _block(seed_lo, seed_hi, idx >> 2, stream, purpose)
    word = idx & 3
    return tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))


@triton.jit
def uint_to_uniform(x):
    s = x.to(tl.int32, bitcast=True)
    s = tl.where(s < 0, -s - 1, s)
    return s.to(tl.float32) * UNIFORM_SCALE


@triton.jit
def philox_uniform(seed_lo, seed_hi, index, stream, purpose):
    """Uniform in [0, 1 - 2^-24] for each int64 ``index``: pyfuse's counter (index, stream, purpose)."""
    return uint_to_uniform(philox_randint(seed_lo, seed_hi, index, stream, purpose))


@triton.jit
def philox_packed_uniform(seed_lo, seed_hi, index, stream, purpose):
    """philox_uniform in the packed layout (philox_packed_randint)."""
    return uint_to_uniform(philox_packed_randint(seed_lo, seed_hi, index, stream, purpose))


@triton.jit
def rand_kernel(out_ptr, numel, seed_lo, seed_hi, offset, stream, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    u = philox_uniform(seed_lo, seed_hi, i + offset, stream, 0)
    tl.store(out_ptr + i, u, mask=mask)


def rand(out, seed_lo: int, seed_hi: int, offset: int, stream: int):
    """Fill float32 ``out`` (contiguous) with uniforms; offset is a signed int64 (wrapping)."""
    n = out.numel()
    block = 1024
    grid = (triton.cdiv(n, block),)
    rand_kernel[grid](out, n, seed_lo, seed_hi, offset, stream, BLOCK=block)
    return out


AOT_SPECS = [
    (
        rand_kernel,
        {"out_ptr": "*fp32", "numel": "i64", "seed_lo": "i64", "seed_hi": "i64", "offset": "i64", "stream": "i32"},
        {"BLOCK": 1024},
    ),
]

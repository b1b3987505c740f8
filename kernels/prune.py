"""Triton kernels of pyfuse.magnitude_prune (threshold from kernels/select.py, then one write pass) and
pyfuse.random_prune (one pass, Philox uniform per flat index). Launch with enable_fp_fusion=False."""
import torch
import triton
import triton.language as tl

from pyfuse.reference.prune import RANDOM_PRUNE_PURPOSE

from .philox import philox_uniform
from .select import BLOCK, keep_mask, key_source, load_key, select_threshold


@triton.jit
def magnitude_prune_kernel(x_ptr, out_ptr, n, state_ptr, before_ptr, KEY_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """x and out are int32 (float32) or int16 (half) views: kept entries are copied bit for bit."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    key = load_key(x_ptr, x_ptr, offs, mask, KEY_KIND)
    keep = keep_mask(key, mask, state_ptr, before_ptr, pid)
    bits = tl.load(x_ptr + offs, mask=mask, other=0)
    tl.store(out_ptr + offs, tl.where(keep, bits, tl.zeros_like(bits)), mask=mask)


@triton.jit
def bf16_bits_rne(v):
    """float32 -> bfloat16 bit pattern (int16), round to nearest even, NaN kept quiet. Written out
    because the interpreter's float32 -> bfloat16 cast truncates while the GPU's rounds."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def random_prune_kernel(x_ptr, out_ptr, n, density, seed_lo, seed_hi, RESCALE: tl.constexpr,
                        PURPOSE: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """out_ptr is an int16 view when OUT_BF16, else of x's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = philox_uniform(seed_lo, seed_hi, offs, 0, PURPOSE)
    v = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.float32)
    if RESCALE:
        v = tl.math.div_rn(v, density)  # correctly rounded, as on the CPU (plain / is approximate)
    out = tl.where(u < density, v, 0.0)
    if OUT_BF16:
        tl.store(out_ptr + offs, bf16_bits_rne(out), mask=mask)
    else:
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def magnitude_prune(src: torch.Tensor, out: torch.Tensor, k: int):
    """Prunes contiguous src into contiguous out (they may be the same tensor)."""
    n = src.numel()
    state, before = select_threshold(src, k)
    xs, _, kind, _ = key_source(src, None)
    outs = out.view(xs.dtype)
    magnitude_prune_kernel[(triton.cdiv(n, BLOCK),)](xs, outs, n, state, before, KEY_KIND=kind, BLOCK=BLOCK)
    return out


def random_prune(src: torch.Tensor, out: torch.Tensor, density: float, seed_lo: int, seed_hi: int, rescale: bool,
                 purpose: int):
    n = src.numel()
    bf16 = src.dtype == torch.bfloat16
    dst = out.view(torch.int16) if bf16 else out
    random_prune_kernel[(triton.cdiv(n, BLOCK),)](src, dst, n, density, seed_lo, seed_hi, RESCALE=rescale,
                                                  PURPOSE=purpose, OUT_BF16=bf16, BLOCK=BLOCK,
                                                  enable_fp_fusion=False)
    return out


AOT_SPECS = [
    (magnitude_prune_kernel,
     {"x_ptr": ptr, "out_ptr": ptr, "n": "i64", "state_ptr": "*i64", "before_ptr": "*i64"},
     {"KEY_KIND": kind, "BLOCK": BLOCK})
    for kind, ptr in ((0, "*i32"), (1, "*i16"))
] + [
    (random_prune_kernel,
     {"x_ptr": ptr, "out_ptr": out, "n": "i64", "density": "fp32", "seed_lo": "i64", "seed_hi": "i64"},
     {"RESCALE": rescale, "PURPOSE": RANDOM_PRUNE_PURPOSE, "OUT_BF16": out == "*i16", "BLOCK": BLOCK})
    for ptr, out in (("*fp32", "*fp32"), ("*fp16", "*fp16"), ("*bf16", "*i16")) for rescale in (True, False)
]

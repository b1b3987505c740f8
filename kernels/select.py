"""Exact top-k threshold selection on the GPU (Triton), without sorting: radix select, 8 key bits per
pass, per-block histograms added with integer atomics (exact, so deterministic), no host sync.

API (stable: pyfuse.prune and the merge kernels use it)
----------------------------------------------------------------------------------------------------
Keys (KEY_KIND, see ``load_key``): 0 = |x| of float32 (bits & 0x7fffffff, x passed as an int32 view),
1 = |x| of float16/bfloat16 (bits & 0x7fff, x as an int16 view), 2 = |x - base| computed in fp32 (x and
base float tensors of one shape). Larger key = larger magnitude; NaN sorts above +inf.

Rule: keep exactly k elements, those of largest key; among keys equal to the k-th largest, lowest flat
index first (same as csrc/cpu/select.h).

    state, before = select_threshold(x, k, base=None, block=BLOCK)

``state`` is int64[4] on x's device: [threshold key T, equal_kept, equal_total, 0]; ``before[j]`` is
the number of keys == T in blocks < j, blocks being [j*block, (j+1)*block). A fused pass launched with
the same ``block`` (one program per block, program j on block j) decides its elements with the jit
helper ``keep_mask(key, mask, state_ptr, before_ptr, pid)``. k == 0 gives T = 2**31 (matches no key).
Passes over the keys: ceil(key bits / 8) histograms + 1 tie count.
"""
import torch
import triton
import triton.language as tl

RADIX_BITS: tl.constexpr = tl.constexpr(8)
RADIX: tl.constexpr = tl.constexpr(256)
BLOCK = 1024
SCAN_CHUNK = 1024


@triton.jit
def load_key(x_ptr, base_ptr, offs, mask, KEY_KIND: tl.constexpr):
    """int32 keys (>= 0) of the elements at offs; 0 where masked."""
    if KEY_KIND == 0:
        key = tl.load(x_ptr + offs, mask=mask, other=0) & 0x7FFFFFFF
    elif KEY_KIND == 1:
        key = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.int32) & 0x7FFF
    else:
        d = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.float32) - tl.load(base_ptr + offs, mask=mask, other=0).to(
            tl.float32
        )
        key = d.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return key


@triton.jit
def keep_mask(key, mask, state_ptr, before_ptr, pid):
    """Exact keep decision for one block's keys (program pid on block pid, as in select_threshold)."""
    threshold = tl.load(state_ptr)
    quota = tl.maximum(tl.load(state_ptr + 1) - tl.load(before_ptr + pid), 0)
    k64 = key.to(tl.int64)
    eq = (mask & (k64 == threshold)).to(tl.int32)
    rank = tl.cumsum(eq, 0) - eq  # equal keys earlier in this block
    return mask & ((k64 > threshold) | ((eq != 0) & (rank < quota)))


@triton.jit
def radix_hist_kernel(x_ptr, base_ptr, n, state_ptr, hist_ptr, SHIFT: tl.constexpr, FIRST: tl.constexpr,
                      KEY_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Adds the histogram of key digit (key >> SHIFT) & 255 over the keys whose higher digits equal the
    prefix chosen so far (state[0])."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    key = load_key(x_ptr, base_ptr, offs, mask, KEY_KIND)
    valid = mask
    if not FIRST:
        valid = valid & ((key >> (SHIFT + RADIX_BITS)).to(tl.int64) == tl.load(state_ptr))
    # Invalid lanes are counted in bin 0 and taken out again (no histogram mask in older Triton).
    h = tl.histogram(tl.where(valid, (key >> SHIFT) & (RADIX - 1), 0), RADIX)
    bins = tl.arange(0, RADIX)
    h = h - tl.where(bins == 0, tl.sum((~valid).to(tl.int32), 0), 0)
    tl.atomic_add(hist_ptr + bins, h.to(tl.int64), mask=h != 0)


@triton.jit
def radix_pick_kernel(state_ptr, hist_ptr, k, FIRST: tl.constexpr):
    """One program: picks the digit holding the need-th largest key, extends the prefix, clears hist."""
    bins = tl.arange(0, RADIX)
    h = tl.load(hist_ptr + bins)
    if FIRST:
        prefix = tl.zeros((), tl.int64)
        need = k.to(tl.int64)
    else:
        prefix = tl.load(state_ptr)
        need = tl.load(state_ptr + 1)
    above = tl.sum(h, 0) - tl.cumsum(h, 0)  # keys in higher bins
    sel = (above < need) & (above + h >= need)
    tl.store(state_ptr, prefix * RADIX + tl.sum(tl.where(sel, bins, 0), 0))
    tl.store(state_ptr + 1, need - tl.sum(tl.where(sel, above, 0), 0))
    tl.store(state_ptr + 2, tl.sum(tl.where(sel, h, 0), 0))
    tl.store(hist_ptr + bins, tl.zeros_like(h))


@triton.jit
def equal_count_kernel(x_ptr, base_ptr, n, state_ptr, counts_ptr, KEY_KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    key = load_key(x_ptr, base_ptr, offs, mask, KEY_KIND)
    eq = mask & (key.to(tl.int64) == tl.load(state_ptr))
    tl.store(counts_ptr + pid, tl.sum(eq.to(tl.int64), 0))


@triton.jit
def exclusive_scan_kernel(counts_ptr, m, CHUNK: tl.constexpr):
    """One program, in place: counts[j] <- sum of counts[i < j]."""
    carry = tl.zeros((), tl.int64)
    for start in range(0, m, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        mask = offs < m
        c = tl.load(counts_ptr + offs, mask=mask, other=0)
        tl.store(counts_ptr + offs, carry + tl.cumsum(c, 0) - c, mask=mask)
        carry += tl.sum(c, 0)


def key_source(x: torch.Tensor, base: torch.Tensor | None):
    """(x operand, base operand, KEY_KIND, key bits) for contiguous x (and base)."""
    if base is not None:
        return x, base, 2, 31
    if x.dtype == torch.float32:
        return x.view(torch.int32), x.view(torch.int32), 0, 31
    return x.view(torch.int16), x.view(torch.int16), 1, 15


def select_threshold(x: torch.Tensor, k: int, base: torch.Tensor | None = None, block: int = BLOCK):
    """(state int64[4], before int64[num_blocks]) for the k largest keys of contiguous x; see the top."""
    n = x.numel()
    blocks = triton.cdiv(n, block)
    if k <= 0 or k >= n:  # no selection needed: T above every key, or T = 0 with every tie kept
        state = torch.tensor([1 << 31 if k <= 0 else 0, 0 if k <= 0 else n, 0, 0], dtype=torch.int64, device=x.device)
        return state, torch.zeros(blocks, dtype=torch.int64, device=x.device)
    xs, bs, kind, bits = key_source(x, base)
    state = torch.zeros(4, dtype=torch.int64, device=x.device)
    hist = torch.zeros(256, dtype=torch.int64, device=x.device)
    shifts = range((bits - 1) // 8 * 8, -1, -8)
    for i, shift in enumerate(shifts):
        radix_hist_kernel[(blocks,)](xs, bs, n, state, hist, SHIFT=shift, FIRST=i == 0, KEY_KIND=kind, BLOCK=block)
        radix_pick_kernel[(1,)](state, hist, k, FIRST=i == 0)
    before = torch.empty(blocks, dtype=torch.int64, device=x.device)
    equal_count_kernel[(blocks,)](xs, bs, n, state, before, KEY_KIND=kind, BLOCK=block)
    exclusive_scan_kernel[(1,)](before, blocks, CHUNK=SCAN_CHUNK)
    return state, before


def _specs():
    specs = []
    for kind, ptr in ((0, "*i32"), (1, "*i16"), (2, "*fp32"), (2, "*bf16")):
        sig = {"x_ptr": ptr, "base_ptr": ptr, "n": "i64", "state_ptr": "*i64"}
        for shift, first in ((24, True), (0, False)):
            specs.append((radix_hist_kernel, {**sig, "hist_ptr": "*i64"},
                          {"SHIFT": shift, "FIRST": first, "KEY_KIND": kind, "BLOCK": BLOCK}))
        specs.append((equal_count_kernel, {**sig, "counts_ptr": "*i64"}, {"KEY_KIND": kind, "BLOCK": BLOCK}))
    for first in (True, False):
        specs.append((radix_pick_kernel, {"state_ptr": "*i64", "hist_ptr": "*i64", "k": "i64"}, {"FIRST": first}))
    specs.append((exclusive_scan_kernel, {"counts_ptr": "*i64", "m": "i64"}, {"CHUNK": SCAN_CHUNK}))
    return specs


AOT_SPECS = _specs()

"""pyfuse::merge_task_vectors in Triton (the math of csrc/include/pyfuse/merge.h; spec: pyfuse.reference.merge).

Statistics: exact top-k thresholds per model from ``kernels/select.py`` (keys |x_i - base| computed on the
fly), turned into the (t, b) form "key > t, or key == t and index < b"; L1 sums per block in float64
(``merge_l1_kernel``). Fused pass (``merge_fused_kernel``): one program per BLOCK elements recomputes every
delta, mask and random number, elects the sign, combines and writes the output once. DELLA ranks each
element on the fly against its row (RANK_TILE columns at a time): O(ncols) work per element, no scratch.

The K model tensors are reached from model 0's pointer plus a per-model element offset (their address
difference), so one kernel serves any K without a pointer-array argument. Launches pass
``enable_fp_fusion=False``: uniforms meet arithmetic before a comparison.
"""
import torch
import triton
import triton.language as tl

from pyfuse.kernels.philox import philox_packed_uniform
from pyfuse.kernels.select import BLOCK as SELECT_BLOCK
from pyfuse.kernels.select import select_threshold

BLOCK = 512
RANK_TILE = 32
# Per-model parameter rows (merge.h struct Model), 5 per model: floats [weight, scale, alpha, p_keep, p_span]
# and ints [t_keep, b_keep, t_drop, b_drop, keep_all].


@triton.jit
def _delta(x_ptr, base_ptr, offs, mask, HAS_BASE: tl.constexpr):
    d = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.float32)
    if HAS_BASE:
        d = d - tl.load(base_ptr + offs, mask=mask, other=0).to(tl.float32)
    return d


@triton.jit
def _key(d):
    return (d.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _in_top(key, offs, t, b):
    return (key > t) | ((key == t) & (offs < b))


@triton.jit
def _bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even (the interpreter's own cast truncates)."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)  # NaN stays NaN
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _row_rank(x_ptr, base_ptr, offs, mask, key, ncols, HAS_BASE: tl.constexpr, RANK_TILE: tl.constexpr):
    """0-based ascending rank of each element's key within its row, ties to the lower column."""
    col = offs % ncols
    row_start = offs - col
    rank = tl.zeros(offs.shape, tl.int64)
    for c0 in range(0, ncols, RANK_TILE):
        cols = c0 + tl.arange(0, RANK_TILE)
        m2 = mask[:, None] & (cols[None, :] < ncols)
        other = _key(_delta(x_ptr, base_ptr, row_start[:, None] + cols[None, :], m2, HAS_BASE))
        before = (other < key[:, None]) | ((other == key[:, None]) & (cols[None, :] < col[:, None]))
        rank += tl.sum((before & m2).to(tl.int64), 1)
    return rank


@triton.jit
def _masked(x0_ptr, base_ptr, xoff_ptr, mf_ptr, mi_ptr, i, offs, mask, ncols, seed_lo, seed_hi, purpose,
            SPARSIFY: tl.constexpr, HAS_BASE: tl.constexpr, RANK_TILE: tl.constexpr):
    """m_i at offs: the delta of model i where its sparsification keeps it, else 0."""
    x_ptr = x0_ptr + tl.load(xoff_ptr + i)
    d = _delta(x_ptr, base_ptr, offs, mask, HAS_BASE)
    keep = tl.load(mi_ptr + i * 5 + 4) != 0
    if SPARSIFY == 1 or SPARSIFY == 3:  # magnitude / breadcrumbs: top t_keep set minus top t_drop set
        key = _key(d)
        top = _in_top(key, offs, tl.load(mi_ptr + i * 5), tl.load(mi_ptr + i * 5 + 1))
        outlier = _in_top(key, offs, tl.load(mi_ptr + i * 5 + 2), tl.load(mi_ptr + i * 5 + 3))
        keep = keep | (top & ~outlier)
    elif SPARSIFY == 2:  # random (DARE)
        u = philox_packed_uniform(seed_lo, seed_hi, offs, i, purpose)
        keep = keep | (u < tl.load(mf_ptr + i * 5 + 3))
    elif SPARSIFY == 4:  # della: keep probability grows with the rank in the row
        rank = _row_rank(x_ptr, base_ptr, offs, mask, _key(d), ncols, HAS_BASE, RANK_TILE)
        t = tl.math.div_rn(rank.to(tl.float32), tl.maximum(ncols - 1, 1).to(tl.float32))
        p = tl.load(mf_ptr + i * 5 + 3) + t * tl.load(mf_ptr + i * 5 + 4)
        u = philox_packed_uniform(seed_lo, seed_hi, offs, i, purpose)
        keep = keep | (u < p)
    else:
        keep = keep | True
    return tl.where(keep, d, 0.0)


@triton.jit
def merge_l1_kernel(x0_ptr, base_ptr, xoff_ptr, mf_ptr, mi_ptr, sums_ptr, n, ncols, k, seed_lo, seed_hi, purpose,
                    SPARSIFY: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK: tl.constexpr, RANK_TILE: tl.constexpr):
    """sums[pid, i] = (sum |d_i|, sum |m_i|) over this block, in float64."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    for i in range(k):
        d = _delta(x0_ptr + tl.load(xoff_ptr + i), base_ptr, offs, mask, HAS_BASE)
        m = _masked(x0_ptr, base_ptr, xoff_ptr, mf_ptr, mi_ptr, i, offs, mask, ncols, seed_lo, seed_hi, purpose,
                    SPARSIFY, HAS_BASE, RANK_TILE)
        row = (pid.to(tl.int64) * k + i) * 2
        tl.store(sums_ptr + row, tl.sum(tl.abs(d).to(tl.float64), 0))
        tl.store(sums_ptr + row + 1, tl.sum(tl.abs(m).to(tl.float64), 0))


@triton.jit
def merge_fused_kernel(out_ptr, x0_ptr, base_ptr, xoff_ptr, mf_ptr, mi_ptr, n, ncols, k, all_q, lam, seed_lo, seed_hi,
                       purpose, SPARSIFY: tl.constexpr, CONSENSUS: tl.constexpr, WEIGHTED: tl.constexpr,
                       NORMALIZE: tl.constexpr, HAS_BASE: tl.constexpr, OUT_BF16: tl.constexpr,
                       BLOCK: tl.constexpr, RANK_TILE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    positive = tl.full((BLOCK,), 1, tl.int1)
    if CONSENSUS != 0:  # sign election; a second sweep below recomputes m_i instead of storing K values
        total = tl.zeros((BLOCK,), tl.float32)
        for i in range(k):
            m = _masked(x0_ptr, base_ptr, xoff_ptr, mf_ptr, mi_ptr, i, offs, mask, ncols, seed_lo, seed_hi, purpose,
                        SPARSIFY, HAS_BASE, RANK_TILE)
            e = m * tl.load(mf_ptr + i * 5 + (2 if WEIGHTED else 1))
            if CONSENSUS == 2:
                e = (e > 0).to(tl.float32) - (e < 0).to(tl.float32)
            total += e
        positive = total >= 0
    acc = tl.zeros((BLOCK,), tl.float32)
    q = tl.zeros((BLOCK,), tl.float32)
    for i in range(k):
        m = _masked(x0_ptr, base_ptr, xoff_ptr, mf_ptr, mi_ptr, i, offs, mask, ncols, seed_lo, seed_hi, purpose,
                    SPARSIFY, HAS_BASE, RANK_TILE)
        v = m * tl.load(mf_ptr + i * 5 + 2)
        if CONSENSUS != 0:
            e = m * tl.load(mf_ptr + i * 5 + (2 if WEIGHTED else 1))
            agree = tl.where(positive, e > 0, e < 0)
        else:
            agree = mask | True
        acc += tl.where(agree, v, 0.0)
        if NORMALIZE == 1:
            q += tl.where(agree, tl.load(mf_ptr + i * 5), 0.0)
        elif NORMALIZE == 2:
            q += agree.to(tl.float32)
    if NORMALIZE == 1:
        acc = tl.math.div_rn(acc, tl.where(q == 0, 1.0, q))
    elif NORMALIZE == 2:
        acc = tl.math.div_rn(acc, tl.maximum(q, 1.0))
    elif NORMALIZE == 3:
        acc = tl.math.div_rn(acc, tl.zeros_like(acc) + all_q)
    res = acc * lam
    if HAS_BASE:
        res = tl.load(base_ptr + offs, mask=mask, other=0).to(tl.float32) + res
    if OUT_BF16:  # out_ptr is the output's int16 view
        tl.store(out_ptr + offs, _bf16_bits(res), mask=mask)
    else:
        tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=mask)


def _top_set(x, base, k: int):
    """(t, b) of the k largest |x - base| (base may be None) in merge.h's form, as two int64 scalars."""
    n = x.numel()
    if k <= 0:
        return 0xFFFFFFFF, 0
    if k >= n:
        return 0, n
    state, before = select_threshold(x, k, base=base)
    t = state[0]
    if base is None and x.dtype != torch.float32:  # 15-bit half key -> the float32 key of the same value
        t = int(torch.tensor([int(t)], dtype=torch.int16).view(x.dtype).float().view(torch.int32)) & 0x7FFFFFFF
    t, kept, total = int(t), int(state[1]), int(state[2])
    if kept == total:
        return t, n
    # The one block whose tie quota runs out: b = index after its last kept tie.
    blk = int((before < kept).sum()) - 1
    need = kept - int(before[blk])
    lo, hi = blk * SELECT_BLOCK, min(n, (blk + 1) * SELECT_BLOCK)
    d = x.reshape(-1)[lo:hi].float() - (base.reshape(-1)[lo:hi].float() if base is not None else 0)
    ties = torch.nonzero((d.view(torch.int32) & 0x7FFFFFFF) == t).reshape(-1)
    return t, lo + int(ties[need - 1]) + 1


def merge_task_vectors(out, base, models, p, sparsify, rescale, consensus, weighted, normalize, lam, seed):
    """Launch on contiguous tensors; ``p`` is ``pyfuse.merge.op.plan``'s per-model plan."""
    from pyfuse.merge.op import CONSENSUS, NORMALIZE, SPARSIFY, della_ncols

    n, k, dev = out.numel(), len(models), out.device
    code = SPARSIFY.index(sparsify)
    ints = []
    for i, x in enumerate(models):
        if code in (1, 3) and not p["keep_all"][i]:
            ints.append([*_top_set(x, base, p["k_keep"][i]), *_top_set(x, base, p["k_drop"][i]), 0])
        else:
            ints.append([0xFFFFFFFF, 0, 0xFFFFFFFF, 0, int(p["keep_all"][i])])
    mi = torch.tensor(ints, dtype=torch.int64, device=dev)
    mf = torch.tensor([[w, s, 0.0, pk, ps] for w, s, pk, ps in zip(p["weights"], p["scale"], p["p_keep"], p["p_span"])],
                      dtype=torch.float32, device=dev)
    size = models[0].element_size()
    xoff = torch.tensor([(x.data_ptr() - models[0].data_ptr()) // size for x in models], dtype=torch.int64, device=dev)
    ncols = della_ncols(out.shape)
    base_arg = base if base is not None else models[0]
    seed_lo, seed_hi = seed & 0xFFFFFFFF, seed >> 32
    grid = (triton.cdiv(n, BLOCK),)
    common = dict(SPARSIFY=code, HAS_BASE=base is not None, BLOCK=BLOCK, RANK_TILE=RANK_TILE, enable_fp_fusion=False)
    if rescale == "l1":
        sums = torch.empty((grid[0], k, 2), dtype=torch.float64, device=dev)
        merge_l1_kernel[grid](models[0], base_arg, xoff, mf, mi, sums, n, ncols, k, seed_lo, seed_hi, p["purpose"],
                              **common)
        before, after = sums.sum(0).unbind(1)
        guard = (before < 1e-7) | (after < 1e-7)
        mf[:, 1] = torch.where(guard, torch.ones_like(before), before / torch.where(guard, 1.0, after)).float()
    mf[:, 2] = mf[:, 0] * mf[:, 1]
    out_bf16 = out.dtype == torch.bfloat16
    merge_fused_kernel[grid](out.view(torch.int16) if out_bf16 else out, models[0], base_arg, xoff, mf, mi, n, ncols,
                             k, p["all_weight_divisor"], lam, seed_lo, seed_hi, p["purpose"],
                             CONSENSUS=CONSENSUS.index(consensus), WEIGHTED=weighted,
                             NORMALIZE=NORMALIZE.index(normalize), OUT_BF16=out_bf16, **common)


def _specs():
    """Every SPARSIFY variant in float32 (fused + L1 statistics), and one bfloat16 variant (int16 output view)."""
    sig = {"x0_ptr": "*fp32", "base_ptr": "*fp32", "xoff_ptr": "*i64", "mf_ptr": "*fp32", "mi_ptr": "*i64",
           "n": "i64", "ncols": "i64", "k": "i32"}
    rng = {"seed_lo": "i64", "seed_hi": "i64", "purpose": "i32"}
    fused = {"out_ptr": "*fp32", **sig, "all_q": "fp32", "lam": "fp32", **rng}
    specs = [(merge_fused_kernel, fused, {"SPARSIFY": sp, "CONSENSUS": 1 + sp % 2, "WEIGHTED": sp % 2 == 0,
                                          "NORMALIZE": sp % 4, "HAS_BASE": sp != 3, "OUT_BF16": False,
                                          "BLOCK": BLOCK, "RANK_TILE": RANK_TILE}) for sp in range(5)]
    specs.append((merge_l1_kernel, {**sig, "sums_ptr": "*fp64", **rng},
                  {"SPARSIFY": 4, "HAS_BASE": True, "BLOCK": BLOCK, "RANK_TILE": RANK_TILE}))
    bf16 = {**fused, "out_ptr": "*i16", "x0_ptr": "*bf16", "base_ptr": "*bf16"}
    specs.append((merge_fused_kernel, bf16, {"SPARSIFY": 1, "CONSENSUS": 1, "WEIGHTED": True, "NORMALIZE": 1,
                                             "HAS_BASE": True, "OUT_BF16": True, "BLOCK": BLOCK,
                                             "RANK_TILE": RANK_TILE}))
    return specs


AOT_SPECS = _specs()

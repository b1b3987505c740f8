"""Union-vocabulary ensembling in Triton: the arithmetic of pyfuse/reference/ensemble.py, operation for
operation (exp from a table and a quadratic, Cephes log, from +, * and bit operations, fixed-point int64
sums), so results are bit-identical to the other backends. Launch with ``enable_fp_fusion=False``.

Models are reached through int64 tables of data pointers (one entry per model), so one kernel serves any
number of models whose vocabularies differ in size.
"""
import triton
import triton.language as tl

from pyfuse.reference import ensemble as spec

FIX_SCALE: tl.constexpr = tl.constexpr(1099511627776.0)  # 2**40
NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
MODE_WRITE: tl.constexpr = tl.constexpr(0)  # union pass: store keys
MODE_MAX: tl.constexpr = tl.constexpr(1)  # union pass: per-tile max key and its lowest union id
MODE_SUM: tl.constexpr = tl.constexpr(2)  # union pass: per-tile fixed-point sum of scores
# exp_det / log_det constants, the reference's values.
LOG2E: tl.constexpr = tl.constexpr(spec.LOG2E)
LN2_HI: tl.constexpr = tl.constexpr(spec.LN2_HI)
LN2_LO: tl.constexpr = tl.constexpr(spec.LN2_LO)
ROUND_32NDS: tl.constexpr = tl.constexpr(spec.ROUND_32NDS)
EXP_C1: tl.constexpr = tl.constexpr(spec.EXP_C1)
EXP_C2: tl.constexpr = tl.constexpr(spec.EXP_C2)


@triton.jit
def _exp2_thirtyseconds(j):
    """2**(j/32) for int32 j in [0, 32), the reference's EXP2_THIRTYSECONDS, as a select tree on j's bits (no
    table in memory: the same code on every GPU and in the interpreter)."""
    b0 = (j & 1) != 0
    t0 = tl.where(b0, 1.0218971967697144, 1.0)
    t1 = tl.where(b0, 1.0671404600143433, 1.0442737340927124)
    t2 = tl.where(b0, 1.114386796951294, 1.0905077457427979)
    t3 = tl.where(b0, 1.1637248992919922, 1.1387885808944702)
    t4 = tl.where(b0, 1.215247392654419, 1.1892070770263672)
    t5 = tl.where(b0, 1.2690509557724, 1.2418577671051025)
    t6 = tl.where(b0, 1.3252366781234741, 1.2968395948410034)
    t7 = tl.where(b0, 1.3839099407196045, 1.3542555570602417)
    t8 = tl.where(b0, 1.4451807737350464, 1.4142135381698608)
    t9 = tl.where(b0, 1.5091644525527954, 1.4768261909484863)
    t10 = tl.where(b0, 1.5759809017181396, 1.5422108173370361)
    t11 = tl.where(b0, 1.6457555294036865, 1.610490322113037)
    t12 = tl.where(b0, 1.7186193466186523, 1.6817928552627563)
    t13 = tl.where(b0, 1.7947090864181519, 1.7562521696090698)
    t14 = tl.where(b0, 1.8741676807403564, 1.8340080976486206)
    t15 = tl.where(b0, 1.9571441411972046, 1.9152065515518188)
    b1 = (j & 2) != 0
    u0 = tl.where(b1, t1, t0)
    u1 = tl.where(b1, t3, t2)
    u2 = tl.where(b1, t5, t4)
    u3 = tl.where(b1, t7, t6)
    u4 = tl.where(b1, t9, t8)
    u5 = tl.where(b1, t11, t10)
    u6 = tl.where(b1, t13, t12)
    u7 = tl.where(b1, t15, t14)
    b2 = (j & 4) != 0
    v0 = tl.where(b2, u1, u0)
    v1 = tl.where(b2, u3, u2)
    v2 = tl.where(b2, u5, u4)
    v3 = tl.where(b2, u7, u6)
    b3 = (j & 8) != 0
    w0 = tl.where(b3, v1, v0)
    w1 = tl.where(b3, v3, v2)
    return tl.where((j & 16) != 0, w1, w0)


@triton.jit
def exp_det(z):
    ok = z >= -87.0
    z = tl.where(ok, z, 0.0)
    kk = (z * LOG2E + ROUND_32NDS) - ROUND_32NDS  # k / 32: the add rounds to a multiple of 1/32
    r = z - kk * LN2_HI
    r = r - kk * LN2_LO
    q = (r * EXP_C2 + EXP_C1) * r
    k = (kk * 32.0).to(tl.int32)
    t = _exp2_thirtyseconds(k & 31)
    scale = (((k >> 5) + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(ok, (t * q + t) * scale, 0.0)


@triton.jit
def log_det(x):
    ok = x >= 1.17549435e-38
    bits = tl.where(ok, x, 1.0).to(tl.int32, bitcast=True)
    e = (bits >> 23) - 126
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < 0.707106781186547524
    e = tl.where(small, e - 1, e)
    m = tl.where(small, (m + m) - 1.0, m - 1.0)
    z = m * m
    y = m * 7.0376836292e-2 + -1.1514610310e-1
    y = y * m + 1.1676998740e-1
    y = y * m + -1.2420140846e-1
    y = y * m + 1.4249322787e-1
    y = y * m + -1.6668057665e-1
    y = y * m + 2.0000714765e-1
    y = y * m + -2.4999993993e-1
    y = y * m + 3.3333331174e-1
    y = y * m
    y = y * z
    fe = e.to(tl.float32)
    y = y + fe * LN2_LO
    y = y - z * 0.5
    r = m + y
    r = r + fe * LN2_HI
    return tl.where(ok, r, NEG_INF)


@triton.jit
def fix(v):
    return (v * FIX_SCALE).to(tl.int64)


@triton.jit
def unfix_recip(total):
    """1 / (fp32(total) * 2**-40) with IEEE division, 0 when total == 0."""
    f = tl.where(total > 0, total.to(tl.float32) * 9.094947017729282e-13, 1.0)
    return tl.where(total > 0, tl.math.div_rn(1.0, f), 0.0)


@triton.jit
def _logits_of(logit_ptrs, m, elem_ptr):
    return tl.load(logit_ptrs + m).to(tl.pointer_type(elem_ptr.dtype.element_ty), bitcast=True)


@triton.jit
def _i32_table(ptrs, m):
    return tl.load(ptrs + m).to(tl.pointer_type(tl.int32), bitcast=True)


@triton.jit
def model_stats_kernel(logit_ptrs, elem_ptr, fwd_ptrs, vocab, stride, inv_temp, mx_out, sum_out, M,
                       BLOCK: tl.constexpr):
    """Program (b, m): mx = max valid y, S = fixed-point sum of exp_det(y - mx)."""
    b = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1)
    x = _logits_of(logit_ptrs, m, elem_ptr) + b * tl.load(stride + m)
    fwd = _i32_table(fwd_ptrs, m)
    V = tl.load(vocab + m)
    it = tl.load(inv_temp + m)
    offs = tl.arange(0, BLOCK)
    mx = tl.full([BLOCK], NEG_INF, tl.float32)
    for v0 in range(0, V, BLOCK):
        v = v0 + offs
        ok = (v < V) & (tl.load(fwd + v, mask=v < V, other=-1) >= 0)
        y = tl.load(x + v, mask=ok, other=0.0).to(tl.float32) * it
        mx = tl.maximum(mx, tl.where(ok, y, NEG_INF))
    top = tl.max(mx, axis=0)
    s = tl.zeros([BLOCK], tl.int64)
    for v0 in range(0, V, BLOCK):
        v = v0 + offs
        ok = (v < V) & (tl.load(fwd + v, mask=v < V, other=-1) >= 0)
        y = tl.load(x + v, mask=ok, other=0.0).to(tl.float32) * it
        s += fix(tl.where(ok, exp_det(y - top), 0.0))
    tl.store(mx_out + b * M + m, top)
    tl.store(sum_out + b * M + m, tl.sum(s, axis=0))


@triton.jit
def _combine(acc, used, P, w, pat, m, LOGPROB: tl.constexpr, RENORM: tl.constexpr):
    """Adds model m's probabilities P with weight w: the weighted sum, or (LOGPROB) the weighted log sum over
    the models that count for each id (RENORM: only those the id's presence pattern says have it)."""
    if LOGPROB:
        take = (acc * 0.0 + w) > 0.0  # a tensor, so that it combines with the pattern bits
        if RENORM:
            take = take & (((pat >> m) & 1) == 1)
        acc = tl.where(take, acc + w * log_det(P), acc)
        used = used | take
    else:
        acc = acc + w * P
    return acc, used


@triton.jit
def _union_keys(b, u, inside, logit_ptrs, elem_ptr, off_ptrs, ids_ptrs, stride, inv_temp, mx, inv_s, present,
                weights, cpat, M, LOGPROB: tl.constexpr, RENORM: tl.constexpr):
    """key(u) for a block of union ids of row b (spec step 2-3)."""
    pat = tl.load(present + u, mask=inside, other=0).to(tl.int32) & ((1 << M) - 1)
    acc = tl.zeros(u.shape, tl.float32)
    used = tl.zeros(u.shape, tl.int1)
    for m in range(M):
        x = _logits_of(logit_ptrs, m, elem_ptr) + b * tl.load(stride + m)
        off = _i32_table(off_ptrs, m)
        ids = _i32_table(ids_ptrs, m)
        it = tl.load(inv_temp + m)
        top = tl.load(mx + b * M + m)
        start = tl.load(off + u, mask=inside, other=0)
        end = tl.load(off + u + 1, mask=inside, other=0)
        E = tl.zeros(u.shape, tl.float32)
        for j in range(0, tl.max(end - start, axis=0)):
            has = start + j < end
            v = tl.load(ids + start + j, mask=has, other=0)
            y = tl.load(x + v, mask=has, other=0.0).to(tl.float32) * it
            E = E + tl.where(has, exp_det(y - top), 0.0)
        P = E * tl.load(inv_s + b * M + m)
        acc, used = _combine(acc, used, P, tl.load(weights + b * M + m), pat, m, LOGPROB, RENORM)
    c = tl.load(cpat + b * (1 << M) + pat, mask=inside, other=0.0)
    if LOGPROB:
        return tl.where(used, acc * c, NEG_INF)
    return acc * c


@triton.jit
def union_pass_kernel(logit_ptrs, elem_ptr, off_ptrs, ids_ptrs, stride, inv_temp, mx, inv_s, present, weights,
                      cpat, kmax, out, tile_val, tile_idx, U, M, n_tiles, MODE: tl.constexpr,
                      LOGPROB: tl.constexpr, RENORM: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, tile): keys of BLOCK union ids; MODE_WRITE stores them in out [B, U]; MODE_MAX stores the
    tile's max key and lowest union id reaching it; MODE_SUM the tile's fixed-point sum of scores."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    u = t.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = u < U
    key = _union_keys(b, u, inside, logit_ptrs, elem_ptr, off_ptrs, ids_ptrs, stride, inv_temp, mx, inv_s,
                      present, weights, cpat, M, LOGPROB, RENORM)
    if MODE == 0:
        tl.store(out + b * U + u, key, mask=inside)
    elif MODE == 1:
        key = tl.where(inside, key, NEG_INF)
        best = tl.max(key, axis=0)
        tl.store(tile_val + b * n_tiles + t, best)
        tl.store(tile_idx + b * n_tiles + t, tl.min(tl.where(inside & (key == best), u, U), axis=0))
    else:
        if LOGPROB:
            top = tl.load(kmax + b)
            key = tl.where(top > NEG_INF, exp_det(key - top), 0.0)
        tl.store(tile_idx + b * n_tiles + t, tl.sum(tl.where(inside, fix(key), 0), axis=0))


@triton.jit
def pick_kernel(logit_ptrs, elem_ptr, off_ptrs, ids_ptrs, stride, inv_temp, mx, inv_s, present, weights, cpat,
                kmax, tile, base, target, chosen, score, U, M, LOGPROB: tl.constexpr, RENORM: tl.constexpr,
                BLOCK: tl.constexpr):
    """Program b: in tile[b], the first union id whose fixed-point cumulative score (from base[b]) exceeds
    target[b]; its score r. Rows with tile[b] < 0 are skipped."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(tile + b)
    if t >= 0:
        u = t * BLOCK + tl.arange(0, BLOCK)
        inside = u < U
        key = _union_keys(b, u, inside, logit_ptrs, elem_ptr, off_ptrs, ids_ptrs, stride, inv_temp, mx, inv_s,
                          present, weights, cpat, M, LOGPROB, RENORM)
        if LOGPROB:
            key = tl.where(tl.load(kmax + b) > NEG_INF, exp_det(key - tl.load(kmax + b)), 0.0)
        f = tl.where(inside, fix(key), 0)
        cum = tl.cumsum(f, axis=0) + tl.load(base + b)
        hit = inside & (cum > tl.load(target + b))
        first = tl.min(tl.where(hit, u, U), axis=0)
        tl.store(chosen + b, first)
        tl.store(score + b, tl.sum(tl.where(u == first, key, 0.0), axis=0))


@triton.jit
def scores_kernel(out, kmax, tile_sum, U, n_tiles, LOGPROB: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, tile): keys in out -> scores (logprob: exp_det(key - kmax)) in place; tile fixed-point sums."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    u = t.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = u < U
    r = tl.load(out + b * U + u, mask=inside, other=0.0)
    if LOGPROB:
        top = tl.load(kmax + b)
        r = tl.where(top > NEG_INF, exp_det(r - top), 0.0)
        tl.store(out + b * U + u, r, mask=inside)
    tl.store(tile_sum + b * n_tiles + t, tl.sum(tl.where(inside, fix(r), 0), axis=0))


@triton.jit
def scale_kernel(out, inv_z, U, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = u < U
    tl.store(out + b * U + u, tl.load(out + b * U + u, mask=inside) * tl.load(inv_z + b), mask=inside)


@triton.jit
def _sort_key(x, v):
    """int64 of (value desc, id asc), larger is better (as pyfuse.reference.ensemble._sort_key)."""
    i = x.to(tl.int32, bitcast=True)
    i = tl.where(i < 0, i ^ 0x7FFFFFFF, i).to(tl.int64)
    return i * 4294967296 + (4294967295 - v)


@triton.jit
def topk_kernel(logit_ptrs, elem_ptr, fwd_ptrs, off_ptrs, ids_ptrs, vocab, stride, inv_temp, present, weights,
                cpat, probs, union_ids, M, K, LOGPROB: tl.constexpr, RENORM: tl.constexpr, BLOCK: tl.constexpr,
                C: tl.constexpr):
    """Program b: UniTE top-k. Each model's top K ids by k passes of a packed-key max; the candidates'
    masses gathered per model, renormalised over the distinct candidates, combined, sorted."""
    b = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, C)
    cand = tl.full([C], -1, tl.int64)
    offs = tl.arange(0, BLOCK)
    mslot = tl.arange(0, 8)
    tops = tl.zeros([8], tl.float32)  # each model's top-1 logit
    for m in range(M):
        x = _logits_of(logit_ptrs, m, elem_ptr) + b * tl.load(stride + m)
        fwd = _i32_table(fwd_ptrs, m)
        V = tl.load(vocab + m)
        prev = tl.full([], 9223372036854775807, tl.int64)
        for i in range(K):
            best = tl.full([BLOCK], -9223372036854775807 - 1, tl.int64)
            for v0 in range(0, V, BLOCK):
                v = v0 + offs
                ok = (v < V) & (tl.load(fwd + v, mask=v < V, other=-1) >= 0)
                key = _sort_key(tl.load(x + v, mask=ok, other=0.0).to(tl.float32), v.to(tl.int64))
                best = tl.maximum(best, tl.where(ok & (key < prev), key, -9223372036854775807 - 1))
            prev = tl.max(best, axis=0)
            found = prev != -9223372036854775807 - 1
            vid = 4294967295 - (prev & 4294967295)
            uid = tl.load(fwd + vid, mask=found, other=-1).to(tl.int64)
            cand = tl.where(slot == m * K + i, uid, cand)
            if i == 0:
                tops = tl.where(mslot == m, tl.load(x + vid, mask=found, other=0.0).to(tl.float32), tops)
    # Distinct candidates: a slot is a duplicate when an earlier slot holds the same union id.
    same = (cand[:, None] == cand[None, :]) & (slot[None, :] < slot[:, None])
    keep = (cand >= 0) & (tl.sum(same.to(tl.int32), axis=1) == 0)
    pat = tl.load(present + cand, mask=keep, other=0).to(tl.int32) & ((1 << M) - 1)
    acc = tl.zeros([C], tl.float32)
    used = tl.zeros([C], tl.int1)
    for m in range(M):
        x = _logits_of(logit_ptrs, m, elem_ptr) + b * tl.load(stride + m)
        off = _i32_table(off_ptrs, m)
        ids = _i32_table(ids_ptrs, m)
        it = tl.load(inv_temp + m)
        # The max valid y is the top-1 id's: a positive temperature keeps the order.
        top = tl.sum(tl.where(mslot == m, tops, 0.0), axis=0) * it
        start = tl.load(off + cand, mask=keep, other=0)
        end = tl.load(off + cand + 1, mask=keep, other=0)
        E = tl.zeros([C], tl.float32)
        for j in range(0, tl.max(end - start, axis=0)):
            has = start + j < end
            v = tl.load(ids + start + j, mask=has, other=0)
            y = tl.load(x + v, mask=has, other=0.0).to(tl.float32) * it
            E = E + tl.where(has, exp_det(y - top), 0.0)
        P = E * unfix_recip(tl.sum(tl.where(keep, fix(E), 0), axis=0))
        acc, used = _combine(acc, used, P, tl.load(weights + b * M + m), pat, m, LOGPROB, RENORM)
    c = tl.load(cpat + b * (1 << M) + pat, mask=keep, other=0.0)
    if LOGPROB:
        key = tl.where(used, acc * c, NEG_INF)
        kmax = tl.max(tl.where(keep, key, NEG_INF), axis=0)
        r = tl.where(keep, tl.where(kmax > NEG_INF, exp_det(key - kmax), 0.0), 0.0)
    else:
        key = acc * c
        r = tl.where(keep, key, 0.0)
    z = tl.sum(tl.where(keep, fix(r), 0), axis=0)
    inv_z = unfix_recip(z)
    # Sort by (key desc, union id asc), duplicates last: the union id rides in the low 32 bits.
    packed = tl.where(keep, _sort_key(key, cand), -9223372036854775807 - 1)
    packed = tl.sort(packed, dim=0, descending=True)
    live = packed != -9223372036854775807 - 1
    out_id = tl.where(live, 4294967295 - (packed & 4294967295), -1)
    hi = (packed >> 32).to(tl.int32)
    out_key = tl.where(hi < 0, hi ^ 0x7FFFFFFF, hi).to(tl.float32, bitcast=True)
    if LOGPROB:
        out_r = tl.where(kmax > NEG_INF, exp_det(out_key - kmax), 0.0)
    else:
        out_r = out_key
    out_p = tl.where(live, out_r * inv_z, 0.0)
    tl.store(probs + b * K + slot, out_p, mask=slot < K)
    tl.store(union_ids + b * K + slot, out_id, mask=slot < K)


_UNION = {"logit_ptrs": "*i64", "elem_ptr": "*fp32", "off_ptrs": "*i64", "ids_ptrs": "*i64", "stride": "*i64",
          "inv_temp": "*fp32", "mx": "*fp32", "inv_s": "*fp32", "present": "*u8", "weights": "*fp32",
          "cpat": "*fp32", "kmax": "*fp32"}
AOT_SPECS = [
    (model_stats_kernel,
     {"logit_ptrs": "*i64", "elem_ptr": "*bf16", "fwd_ptrs": "*i64", "vocab": "*i64", "stride": "*i64",
      "inv_temp": "*fp32", "mx_out": "*fp32", "sum_out": "*i64", "M": "i32"}, {"BLOCK": 1024}),
    *[(union_pass_kernel,
       {**_UNION, "out": "*fp32", "tile_val": "*fp32", "tile_idx": "*i64", "U": "i64", "M": "i32", "n_tiles": "i32"},
       {"MODE": mode, "LOGPROB": logprob, "RENORM": renorm, "BLOCK": 1024})
      for mode in (0, 1, 2) for logprob, renorm in ((False, False), (True, True))],
    (pick_kernel,
     {**_UNION, "tile": "*i64", "base": "*i64", "target": "*i64", "chosen": "*i64", "score": "*fp32", "U": "i64",
      "M": "i32"}, {"LOGPROB": True, "RENORM": False, "BLOCK": 1024}),
    (scores_kernel, {"out": "*fp32", "kmax": "*fp32", "tile_sum": "*i64", "U": "i64", "n_tiles": "i32"},
     {"LOGPROB": True, "BLOCK": 1024}),
    (scale_kernel, {"out": "*fp32", "inv_z": "*fp32", "U": "i64"}, {"BLOCK": 1024}),
    (topk_kernel,
     {"logit_ptrs": "*i64", "elem_ptr": "*fp16", "fwd_ptrs": "*i64", "off_ptrs": "*i64", "ids_ptrs": "*i64",
      "vocab": "*i64", "stride": "*i64", "inv_temp": "*fp32", "present": "*u8", "weights": "*fp32", "cpat": "*fp32",
      "probs": "*fp32", "union_ids": "*i64", "M": "i32", "K": "i32"},
     {"LOGPROB": True, "RENORM": True, "BLOCK": 1024, "C": 64}),
]

"""Plain-torch specification of the union-vocabulary ensembling ops (``pyfuse.ensemble``).

Notation, per batch row b: model m has logits x_m [V_m] and temperature T_m; ``inv_temp[m] = fp32(1/T_m)``;
weights w [M] (normalised to sum 1, >= 0). Only ids with ``to_union[m][v] >= 0`` ("valid") take part.

1. Model statistics: y_v = fp32(x_v) * inv_temp, mx = max valid y, e_v = exp_det(y_v - mx),
   S = fixed-point sum of e_v, inv_s = 1 / S.
2. Per union id u: E_m(u) = sum of e_v over the model ids v of u, ascending v, left to right;
   P_m(u) = E_m(u) * inv_s (the model's softmax mass on u; 0 when the model lacks u).
3. Combination, c(u) = 1 for absent="zero", 1 / (sum of w_m over the models having u) for "renormalize":
   mode "prob":    key(u) = (sum_m w_m * P_m(u)) * c(u),                       r(u) = key(u)
   mode "logprob": key(u) = (sum_m w_m * log_det(P_m(u))) * c(u), r(u) = exp_det(key(u) - max key)
   In logprob mode a model is left out of the sum when w_m == 0 or (renormalize and it lacks u); a union
   id no model contributes to gets key -inf. Sums over m run in model order.
4. p(u) = r(u) * inv_z, Z = fixed-point sum of r over the union (inv_z = 0 when Z == 0). In mode "prob"
   with absent="zero" the keys already sum to 1 (up to rounding): inv_z = 1 there, p(u) = key(u).

Bit-exact on every backend: every float operation above is a single IEEE operation in a fixed order,
``exp_det`` (a 32-entry table and a quadratic) and ``log_det`` (Cephes) use +, * and bit operations only
(no libm, no FMA), and sums over sets whose order would depend on the tiling are fixed-point int64 sums
(units 2**-40, truncated), which are exact and order-free. ``fix(v) = trunc(v * 2**40)``; S, Z as floats
are ``fp32(int) * 2**-40``.
"""
from __future__ import annotations

import torch

FIX_SCALE = float(1 << 40)
FIX_UNIT = 1.0 / FIX_SCALE
# Philox purpose word (counter c3) of next_token sampling: ASCII "ENSM". Counter = (row, 0, stream, purpose).
SAMPLE_PURPOSE = 0x454E534D
EXP_LOW = -87.0  # exp_det(z) = 0 below: keeps the scale 2**(k >> 5) and the result normal floats
FLT_MIN = 1.1754943508222875e-38  # log_det(x) = -inf below (no subnormal frexp)


# 2**(j/32), j = 0..31, rounded to float32: exp_det's table (the same values in every backend).
EXP2_THIRTYSECONDS = tuple(float.fromhex(h) for h in (
    "0x1p+0", "0x1.059b0ep+0", "0x1.0b5586p+0", "0x1.11301ep+0", "0x1.172b84p+0", "0x1.1d4874p+0", "0x1.2387a6p+0",
    "0x1.29e9e0p+0", "0x1.306fe0p+0", "0x1.371a74p+0", "0x1.3dea64p+0", "0x1.44e086p+0", "0x1.4bfdaep+0",
    "0x1.5342b6p+0", "0x1.5ab07ep+0", "0x1.6247ecp+0", "0x1.6a09e6p+0", "0x1.71f75ep+0", "0x1.7a1148p+0",
    "0x1.82589ap+0", "0x1.8ace54p+0", "0x1.93737cp+0", "0x1.9c4918p+0", "0x1.a5503cp+0", "0x1.ae89fap+0",
    "0x1.b7f770p+0", "0x1.c199bep+0", "0x1.cb720ep+0", "0x1.d5818ep+0", "0x1.dfc974p+0", "0x1.ea4afap+0",
    "0x1.f50766p+0"))
_EXP2_TABLE = torch.tensor(EXP2_THIRTYSECONDS, dtype=torch.float32)
ROUND_32NDS = 393216.0  # 1.5 * 2**18: a float32 in [2**18, 2**19) has ulp 1/32
LOG2E = 1.44269504088896341
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # Cephes' two-part ln2 (exp_det, log_det)
EXP_C1 = 1.000014305114746  # exp(r) - 1 ~ r * (EXP_C1 + EXP_C2 * r) on |r| <= ln2/64, fitted (float32 values)
EXP_C2 = 0.49996230006217957


def exp_det(z: torch.Tensor) -> torch.Tensor:
    """exp(z) for float32 z <= 0, within 1.73 ulp (1.72 at z = -0.76896); 0 for z < -87, -inf or NaN; exactly
    1 at z = 0.

    z = k ln2/32 + r, k = round-to-nearest(32 z log2e) (computed as (z log2e + 1.5 * 2**18) - 1.5 * 2**18: the
    add rounds to a multiple of 1/32), |r| <= ln2/64 (Cody-Waite with Cephes' two-part ln2); exp(z) =
    2**(k >> 5) * t * (1 + q), t = 2**((k & 31)/32) from a table, q = r * (C1 + C2 r), a quadratic fitted for
    the least maximum error, evaluated as t*q + t. A vector CPU loop needs about 14 floating-point
    instructions per 16 values (the low five mantissa bits of the rounding add are the table index of one
    vpermt2ps, vscalefps does the scale), against about 22 for Cephes' degree-7 polynomial over
    |r| <= ln2/2 that this replaced: the exponential passes are bound by that instruction count.
    """
    ok = z >= EXP_LOW
    z = torch.where(ok, z, torch.zeros_like(z))
    kk = (z * LOG2E + ROUND_32NDS) - ROUND_32NDS  # k / 32, exact
    r = z - kk * LN2_HI
    r = r - kk * LN2_LO
    q = (r * EXP_C2 + EXP_C1) * r
    k = (kk * 32.0).to(torch.int32)
    t = _EXP2_TABLE.to(z.device)[(k & 31).long()]
    scale = (((k >> 5) + 127) << 23).view(torch.float32)
    return torch.where(ok, (t * q + t) * scale, torch.zeros_like(z))


def log_det(x: torch.Tensor) -> torch.Tensor:
    """log(x) for float32 x >= 0 (Cephes logf); -inf for x < FLT_MIN."""
    ok = x >= FLT_MIN
    bits = torch.where(ok, x, torch.ones_like(x)).view(torch.int32)
    e = (bits >> 23) - 126
    m = ((bits & 0x007FFFFF) | 0x3F000000).view(torch.float32)
    small = m < 0.707106781186547524
    e = torch.where(small, e - 1, e)
    m = torch.where(small, (m + m) - 1.0, m - 1.0)
    z = m * m
    y = m * 7.0376836292e-2 + -1.1514610310e-1
    for c in (1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1,
              -2.4999993993e-1, 3.3333331174e-1):
        y = y * m + c
    y = y * m
    y = y * z
    fe = e.to(torch.float32)
    y = y + fe * LN2_LO
    y = y - z * 0.5
    r = m + y
    r = r + fe * LN2_HI
    return torch.where(ok, r, torch.full_like(r, float("-inf")))


def fix(v: torch.Tensor) -> torch.Tensor:
    """Fixed-point int64 of v >= 0 in units of 2**-40 (truncated)."""
    return (v * FIX_SCALE).to(torch.int64)


def unfix_recip(total: torch.Tensor) -> torch.Tensor:
    """1 / (fp32(total) * 2**-40), or 0 where total == 0."""
    f = total.to(torch.float32) * FIX_UNIT
    return torch.where(total > 0, 1.0 / torch.where(total > 0, f, torch.ones_like(f)), torch.zeros_like(f))


def model_exps(x: torch.Tensor, to_union: torch.Tensor, inv_temp: float):
    """(e [B, V] with 0 at invalid ids, inv_s [B]) of one model."""
    valid = to_union >= 0
    y = x.float() * torch.tensor(inv_temp, dtype=torch.float32, device=x.device)
    y = torch.where(valid, y, torch.full_like(y, float("-inf")))
    mx = y.amax(dim=1, keepdim=True) if y.shape[1] else y.new_full((y.shape[0], 1), float("-inf"))
    e = torch.where(valid, exp_det(y - mx), torch.zeros_like(y))
    return e, unfix_recip(fix(e).sum(dim=1))


def gather_union(e: torch.Tensor, rev_offsets: torch.Tensor, rev_ids: torch.Tensor, union_ids: torch.Tensor):
    """E(u) [B, n] for the union ids ``union_ids`` [n] (or [B, n]): e summed over each reverse list in
    list order, one list position at a time."""
    off = rev_offsets.to(torch.int64)
    start, count = off[union_ids], off[union_ids + 1] - off[union_ids]
    if union_ids.dim() == 1:
        start, count = start.expand(e.shape[0], -1), count.expand(e.shape[0], -1)
    acc = torch.zeros(start.shape, dtype=torch.float32, device=e.device)
    longest = int(count.max()) if count.numel() else 0
    for j in range(longest):
        has = count > j
        pos = torch.where(has, start + j, torch.zeros_like(start)).clamp(max=max(rev_ids.numel() - 1, 0))
        v = rev_ids.to(torch.int64)[pos] if rev_ids.numel() else torch.zeros_like(pos)
        acc = torch.where(has, acc + torch.gather(e, 1, v), acc)
    return acc


def combine(P: list, present: torch.Tensor, weights: torch.Tensor, cpat: torch.Tensor, logprob: bool,
            renormalize: bool):
    """key(u) [B, n] from the per-model masses P[m] [B, n]; present [B or 1, n] bit patterns (int64)."""
    c = torch.gather(cpat, 1, present.expand(P[0].shape[0], -1))
    acc = torch.zeros_like(P[0])
    if not logprob:
        for m, pm in enumerate(P):
            acc = acc + weights[:, m:m + 1] * pm
        return acc * c
    used = torch.zeros(P[0].shape, dtype=torch.bool, device=acc.device)
    for m, pm in enumerate(P):
        take = weights[:, m:m + 1] > 0
        if renormalize:
            take = take & (((present >> m) & 1) == 1)
        acc = torch.where(take, acc + weights[:, m:m + 1] * log_det(pm), acc)
        used |= take
    return torch.where(used, acc * c, torch.full_like(acc, float("-inf")))


def union_keys(logits, tables, weights, cpat, inv_temp, logprob, renormalize):
    """key(u) for the whole union [B, U]."""
    U = tables.union_size
    ids = torch.arange(U, device=weights.device)
    P = []
    for m, x in enumerate(logits):
        e, inv_s = model_exps(x, tables.to_union[m], inv_temp[m])
        P.append(gather_union(e, tables.rev_offsets[m], tables.rev_ids[m], ids) * inv_s[:, None])
    present = tables.present.to(torch.int64)[None, :]
    return combine(P, present, weights, cpat, logprob, renormalize)


def scores(key: torch.Tensor, logprob: bool, normalize: bool = True):
    """(r, inv_z) from keys: r = key (prob) or exp_det(key - max key) (logprob); inv_z = 1 unless normalize."""
    if logprob:
        kmax = key.amax(dim=1, keepdim=True)
        r = torch.where(kmax > float("-inf"), exp_det(key - kmax), torch.zeros_like(key))
    else:
        r = key
    if not normalize:
        return r, torch.ones(key.shape[0], dtype=torch.float32, device=key.device)
    return r, unfix_recip(fix(r).sum(dim=1))


def union_probs(logits, tables, weights, cpat, inv_temp, logprob, renormalize):
    key = union_keys(logits, tables, weights, cpat, inv_temp, logprob, renormalize)
    r, inv_z = scores(key, logprob, logprob or renormalize)
    return r * inv_z[:, None]


def sample_target(total: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """floor(Z * s / 2**31) for the Philox 31-bit draw s of each row (counter (b, 0, stream, purpose))."""
    from .philox import philox_torch

    B = total.shape[0]
    idx = torch.arange(B, dtype=torch.int64, device=total.device)
    zero = torch.zeros_like(idx)
    w0 = philox_torch(idx, zero, zero + stream, zero + SAMPLE_PURPOSE, seed & 0xFFFFFFFF, seed >> 32)[0]
    s = w0.to(torch.int64) & 0xFFFFFFFF
    s = torch.where(s >= 1 << 31, (1 << 32) - 1 - s, s)  # tl.rand's fold of negative int32: ~x
    return (total >> 31) * s + (((total & ((1 << 31) - 1)) * s) >> 31)


def next_token(logits, tables, weights, cpat, inv_temp, logprob, renormalize, greedy, seed, stream):
    """(union_ids [B] int64, model_ids [B, M] int64, prob [B] float32)."""
    key = union_keys(logits, tables, weights, cpat, inv_temp, logprob, renormalize)
    r, inv_z = scores(key, logprob, logprob or renormalize)
    fr = fix(r)
    total = fr.sum(dim=1)
    if greedy:
        u = torch.argmax(key, dim=1)  # first maximum: lowest union id wins ties
        none = key.amax(dim=1) <= (float("-inf") if logprob else 0.0)
    else:
        target = sample_target(total, seed, stream)
        u = (torch.cumsum(fr, dim=1) <= target[:, None]).sum(dim=1).clamp(max=max(key.shape[1] - 1, 0))
        none = total == 0
    u = torch.where(none, torch.full_like(u, -1), u)
    safe = u.clamp(min=0)
    prob = torch.where(none, torch.zeros_like(inv_z), torch.gather(r, 1, safe[:, None])[:, 0] * inv_z)
    model_ids = torch.stack([torch.where(none, torch.full_like(u, -1), f.to(torch.int64)[safe])
                             for f in tables.from_union], dim=1)
    return u, model_ids, prob


def _sort_key(x: torch.Tensor) -> torch.Tensor:
    """int64 key ordering (value desc, id asc) as one integer, larger = better: the value's order-preserving
    int32 in the high half, 2**32 - 1 - id in the low half."""
    i = x.float().contiguous().view(torch.int32).to(torch.int64)
    i = torch.where(i < 0, i ^ 0x7FFFFFFF, i)
    ids = torch.arange(x.shape[1], dtype=torch.int64, device=x.device)
    return i * (1 << 32) + ((1 << 32) - 1 - ids)


def union_topk(logits, tables, weights, cpat, inv_temp, logprob, renormalize, k):
    """(probs [B, k] float32, union_ids [B, k] int64): see pyfuse.ensemble.union_topk."""
    B = weights.shape[0]
    cands = []
    for m, x in enumerate(logits):
        valid = tables.to_union[m] >= 0
        key = torch.where(valid, _sort_key(x), torch.full_like(_sort_key(x), torch.iinfo(torch.int64).min))
        top = torch.topk(key, k, dim=1).indices  # keys are distinct, so the order is unique
        cands.append(tables.to_union[m].to(torch.int64)[top])
    cand = torch.cat(cands, dim=1)  # [B, M*k], duplicates allowed
    cand, _ = torch.sort(cand, dim=1)
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
    P = []
    for m, x in enumerate(logits):
        valid = tables.to_union[m] >= 0
        it = torch.tensor(inv_temp[m], dtype=torch.float32, device=x.device)
        y = torch.where(valid, x.float() * it, torch.full_like(x, float("-inf"), dtype=torch.float32))
        e = torch.where(valid, exp_det(y - y.amax(dim=1, keepdim=True)), torch.zeros_like(y))
        E = gather_union(e, tables.rev_offsets[m], tables.rev_ids[m], cand)
        E = torch.where(dup, torch.zeros_like(E), E)
        P.append(E * unfix_recip(fix(E).sum(dim=1))[:, None])
    present = tables.present.to(torch.int64)[cand]
    key = combine(P, present, weights, cpat, logprob, renormalize)
    key = torch.where(dup, torch.full_like(key, float("-inf") if logprob else -1.0), key)
    r, inv_z = scores(key, logprob)
    r = torch.where(dup, torch.zeros_like(r), r)
    inv_z = unfix_recip(fix(r).sum(dim=1))
    p = r * inv_z[:, None]
    # Order: key desc, union id asc (candidates are sorted by id and the sorts are stable); duplicates last.
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    last = torch.sort(torch.gather(dup, 1, order).to(torch.int8), dim=1, stable=True).indices
    order = torch.gather(order, 1, last)[:, :k]
    ids = torch.gather(cand, 1, order)
    probs = torch.gather(p, 1, order)
    gone = torch.gather(dup, 1, order)
    return torch.where(gone, torch.zeros_like(probs), probs), torch.where(gone, torch.full_like(ids, -1), ids)

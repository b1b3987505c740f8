"""Tree verification (``pyfuse.spec.verify_tree``) in Triton: one program per batch row walks the tree with the
rules of ``pyfuse.reference.spec_tree`` and ``csrc/include/pyfuse/spec_tree.h`` (fixed-point int64 weights,
one IEEE double operation at a time), so it matches them bit for bit. Passes over the vocabulary go in
BLOCK-wide tiles. Launched with ``enable_fp_fusion=False``: no FMA where a uniform meets a comparison."""
import torch
import triton
import triton.language as tl

from .philox import philox_uniform

PURPOSE_ACCEPT: tl.constexpr = tl.constexpr(0x74726561)
PURPOSE_FINAL: tl.constexpr = tl.constexpr(0x74726566)
SCALE: tl.constexpr = tl.constexpr(4294967296.0)


@triton.jit
def _fixed(p):
    """trunc(clamp(p, 0, 1) * 2^32); NaN and negatives weigh 0."""
    p = p.to(tl.float32)
    p = tl.where(p > 0.0, tl.minimum(p, 1.0), 0.0)
    return (p * SCALE).to(tl.int64)


@triton.jit
def _reciprocal(total):
    return tl.where(total > 0, 1.0 / tl.maximum(total, 1).to(tl.float64), 0.0)


@triton.jit
def _next_child(sib, c, count, n):
    """Next sibling of c, or -1: index outside [1, N) or count >= N - 1 ends the list."""
    s = tl.load(sib + c)
    return tl.where((s > 0) & (s < n) & (count < n - 1), s, -1)


@triton.jit
def _weights(p_row, q_row, inv_totals, steps, q_inv, cand, first, sib, n, excluded, offs, mask):
    """Weights of tokens ``offs``: row p through ``steps`` residual steps against q, minus the tokens of
    ``excluded``'s children (when excluded >= 0)."""
    w = _fixed(tl.load(p_row + offs, mask=mask, other=0.0))
    if steps > 0:
        wq = _fixed(tl.load(q_row + offs, mask=mask, other=0.0)).to(tl.float64)
        for k in range(0, steps):
            r = w.to(tl.float64) * tl.load(inv_totals + k) - wq * q_inv
            w = (tl.where(r > 0.0, r, 0.0) * SCALE).to(tl.int64)
    if excluded >= 0:
        c = tl.load(first + excluded)
        c = tl.where((c > 0) & (c < n), c, -1)
        count = 1
        while c >= 0:
            w = tl.where(offs == tl.load(cand + c), 0, w)
            c = _next_child(sib, c, count, n)
            count += 1
    return w


@triton.jit
def _sum(p_row, q_row, inv_totals, steps, q_inv, cand, first, sib, n, excluded, vocab, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        acc += _weights(p_row, q_row, inv_totals, steps, q_inv, cand, first, sib, n, excluded, offs, offs < vocab)
    return tl.sum(acc, axis=0)


@triton.jit
def _weight_at(p_row, q_row, inv_totals, steps, q_inv, cand, first, sib, n, excluded, x):
    offs = x + tl.arange(0, 2).to(tl.int64)
    w = _weights(p_row, q_row, inv_totals, steps, q_inv, cand, first, sib, n, excluded, offs, offs == x)
    return tl.sum(tl.where(offs == x, w, 0), axis=0)


@triton.jit
def _sample(p_row, q_row, inv_totals, steps, q_inv, cand, first, sib, n, excluded, vocab, threshold,
            BLOCK: tl.constexpr):
    """First token whose cumulative weight exceeds threshold (< total)."""
    base = tl.zeros([], dtype=tl.int64)
    result = vocab + base
    start = base
    while (start < vocab) & (result == vocab):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < vocab
        w = _weights(p_row, q_row, inv_totals, steps, q_inv, cand, first, sib, n, excluded, offs, mask)
        cum = tl.cumsum(w, axis=0) + base
        result = tl.min(tl.where(mask & (cum.to(tl.float64) > threshold), offs, vocab), axis=0)
        base += tl.sum(w, axis=0)
        start += BLOCK
    return tl.minimum(result, vocab - 1)


@triton.jit
def _argmax(row, vocab, BLOCK: tl.constexpr):
    """First index of the maximum; NaN never wins; an all-NaN/-inf row gives 0."""
    best_v = tl.full([], float("-inf"), tl.float32)
    best_i = tl.zeros([], dtype=tl.int64)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        v = tl.load(row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        v = tl.where(v == v, v, float("-inf"))
        m = tl.max(v, axis=0)
        i = tl.min(tl.where(v == m, offs, vocab), axis=0)
        take = m > best_v
        best_i = tl.where(take, i, best_i)
        best_v = tl.where(take, m, best_v)
    return best_i


@triton.jit
def _coin(u_row, seed_lo, seed_hi, stream, index, purpose, HAS_U: tl.constexpr):
    if HAS_U:
        u = tl.load(u_row + index)
    else:
        u = philox_uniform(seed_lo, seed_hi, index, stream, purpose)
    return u


@triton.jit
def verify_tree_kernel(cand_ptr, first_ptr, sib_ptr, target_ptr, draft_ptr, batch_stride, node_stride, n, vocab,
                       max_depth, seeds_ptr, row_streams, u_ptr, uf_ptr, work_ptr, accept_index_ptr,
                       accept_len_ptr, token_ids_ptr, bonus_ptr, MODE: tl.constexpr, HAS_U: tl.constexpr,
                       BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    zero = b * 0
    cand = cand_ptr + b * n
    first = first_ptr + b * n
    sib = sib_ptr + b * n
    target = target_ptr + b * batch_stride
    draft = draft_ptr + b * batch_stride
    inv_totals = work_ptr + b * n
    u_row = u_ptr + b * n
    width = max_depth + 1
    out_index = accept_index_ptr + b * width
    out_tokens = token_ids_ptr + b * width
    seed = tl.load(seeds_ptr + b)
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    stream = (b * row_streams).to(tl.uint32)

    # Residual of the final draw: (p row, q row, steps, q_inv, excluded) as in Weights.
    res_p = target
    res_q = draft
    res_steps = zero
    res_q_inv = zero.to(tl.float64)
    res_excl = zero - 1
    cur = zero
    depth = zero
    rejected = zero
    tl.store(out_index, 0)
    c0 = tl.load(first)
    active = (depth < max_depth) & (c0 > 0) & (c0 < n)
    while active:
        row = target + cur * node_stride
        found = zero - 1
        c = c0
        count = zero + 1
        if MODE == 0:
            best = _argmax(row, vocab, BLOCK)
            while (c >= 0) & (found < 0):
                found = tl.where(tl.load(cand + c) == best, c, found)
                c = _next_child(sib, c, count, n)
                count += 1
        elif MODE == 1:
            total = _sum(row, row, inv_totals, zero, 0.0, cand, first, sib, n, zero - 1, vocab, BLOCK)
            coin = _coin(u_row, seed_lo, seed_hi, stream, cur, PURPOSE_ACCEPT, HAS_U)
            threshold = coin.to(tl.float64) * total.to(tl.float64)
            acc = zero
            while (c >= 0) & (found < 0):
                x = tl.load(cand + c)
                fresh = (x >= 0) & (x < vocab)
                e = c0
                seen = zero + 1
                while (e != c) & fresh:
                    fresh = tl.load(cand + e) != x
                    e = _next_child(sib, e, seen, n)
                    e = tl.where(e < 0, c, e)
                    seen += 1
                if fresh:
                    acc += _fixed(tl.load(row + x))
                found = tl.where(fresh & (threshold < acc.to(tl.float64)), c, found)
                c = _next_child(sib, c, count, n)
                count += 1
            res_p = row
            res_excl = tl.where(found < 0, cur, -1)
        else:
            q_row = draft + cur * node_stride
            q_inv = _reciprocal(_sum(q_row, q_row, inv_totals, zero, 0.0, cand, first, sib, n, zero - 1, vocab,
                                     BLOCK))
            steps = zero
            while (c >= 0) & (found < 0):
                x = tl.load(cand + c)
                inv = _reciprocal(_sum(row, q_row, inv_totals, steps, q_inv, cand, first, sib, n, zero - 1,
                                       vocab, BLOCK))
                if (x >= 0) & (x < vocab) & (inv > 0.0):
                    qx = _fixed(tl.load(q_row + x)).to(tl.float64) * q_inv
                    px = _weight_at(row, q_row, inv_totals, steps, q_inv, cand, first, sib, n, zero - 1,
                                    x).to(tl.float64) * inv
                    coin = _coin(u_row, seed_lo, seed_hi, stream, c, PURPOSE_ACCEPT, HAS_U)
                    found = tl.where(coin.to(tl.float64) * qx < px, c, found)
                if found < 0:
                    tl.store(inv_totals + steps, inv)
                    steps += 1
                c = _next_child(sib, c, count, n)
                count += 1
            res_p = row
            res_q = q_row
            res_steps = steps
            res_q_inv = q_inv
        if found < 0:
            rejected = zero + 1
            active = zero != zero
        else:
            depth += 1
            cur = found
            tl.store(out_index + depth, cur.to(tl.int32))
            tl.store(out_tokens + depth - 1, tl.load(cand + cur).to(tl.int32))
            c0 = tl.load(first + cur)
            active = (depth < max_depth) & (c0 > 0) & (c0 < n)

    if MODE == 0:
        last = _argmax(target + cur * node_stride, vocab, BLOCK)
    else:
        if rejected == 0:
            res_p = target + cur * node_stride
            res_steps = zero
            res_excl = zero - 1
        u = _coin(uf_ptr + b, seed_lo, seed_hi, stream, zero, PURPOSE_FINAL, HAS_U)
        total = _sum(res_p, res_q, inv_totals, res_steps, res_q_inv, cand, first, sib, n, res_excl, vocab, BLOCK)
        if total > 0:
            last = _sample(res_p, res_q, inv_totals, res_steps, res_q_inv, cand, first, sib, n, res_excl, vocab,
                           u.to(tl.float64) * total.to(tl.float64), BLOCK)
        else:
            base_row = target + cur * node_stride
            total = _sum(base_row, base_row, inv_totals, zero, 0.0, cand, first, sib, n, zero - 1, vocab, BLOCK)
            last = zero
            if total > 0:
                last = _sample(base_row, base_row, inv_totals, zero, 0.0, cand, first, sib, n, zero - 1, vocab,
                               u.to(tl.float64) * total.to(tl.float64), BLOCK)
    tl.store(out_tokens + depth, last.to(tl.int32))
    tl.store(accept_len_ptr + b, depth.to(tl.int32))
    tl.store(bonus_ptr + b, last.to(tl.int32))
    for start in range(0, width, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        pad = (offs < width) & (offs > depth)
        tl.store(out_index + offs, -1, mask=pad)
        tl.store(out_tokens + offs, -1, mask=pad)


def verify_tree(candidates, next_token, next_sibling, target, draft, mode: int, max_depth: int, seeds,
                row_streams: bool, uniforms, outs):
    """Launch over the batch; tree arrays int64 contiguous; target/draft rows contiguous along V."""
    batch, n, vocab = target.shape
    if target.stride(-1) != 1 or (draft is not None and draft.stride() != target.stride()):
        target = target.contiguous()
        draft = None if draft is None else draft.contiguous()
    work = torch.empty(batch, n, dtype=torch.float64, device=target.device)
    unused = torch.empty(1, dtype=torch.float32, device=target.device)
    u = uniforms[0].contiguous() if uniforms is not None else unused
    uf = uniforms[1, :, 0].contiguous() if uniforms is not None else unused
    block = min(1024, triton.next_power_of_2(max(vocab, max_depth + 1)))
    accept_index, accept_len, token_ids, bonus = outs
    verify_tree_kernel[(batch,)](
        candidates, next_token, next_sibling, target, target if draft is None else draft, target.stride(0),
        target.stride(1), n, vocab, max_depth, seeds, int(row_streams), u, uf, work, accept_index, accept_len,
        token_ids, bonus, MODE=mode, HAS_U=uniforms is not None, BLOCK=block, enable_fp_fusion=False)


def _aot(mode, has_u, dtype):
    signature = {"cand_ptr": "*i64", "first_ptr": "*i64", "sib_ptr": "*i64", "target_ptr": f"*{dtype}",
                 "draft_ptr": f"*{dtype}", "batch_stride": "i64", "node_stride": "i64", "n": "i64", "vocab": "i64",
                 "max_depth": "i64", "seeds_ptr": "*i64", "row_streams": "i32", "u_ptr": "*fp32",
                 "uf_ptr": "*fp32", "work_ptr": "*fp64", "accept_index_ptr": "*i32", "accept_len_ptr": "*i32",
                 "token_ids_ptr": "*i32", "bonus_ptr": "*i32"}
    return (verify_tree_kernel, signature, {"MODE": mode, "HAS_U": has_u, "BLOCK": 1024})


AOT_SPECS = [_aot(0, False, "bf16"), _aot(1, False, "fp32"), _aot(2, False, "fp16"), _aot(2, True, "fp32")]

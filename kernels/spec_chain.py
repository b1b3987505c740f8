"""Chain verification (verify_greedy / rejection_sample / typical_accept) in Triton: one program per
request walks its draft positions in order, with vocabulary-wide reductions in BLOCK-wide tiles. Same
decisions as csrc/include/pyfuse/spec_chain.h and pyfuse.reference.spec; the recovered/bonus token is an
inverse CDF over int64 fixed-point weights, so it matches the other backends bit for bit on probability
inputs. Launch with ``enable_fp_fusion=False`` (the accept test multiplies a uniform before comparing)."""
import triton
import triton.language as tl

from .philox import philox_uniform

GREEDY: tl.constexpr = tl.constexpr(0)
REJECTION: tl.constexpr = tl.constexpr(1)
TYPICAL: tl.constexpr = tl.constexpr(2)
ACCEPT_DRAW: tl.constexpr = tl.constexpr(1)
RESIDUAL_DRAW: tl.constexpr = tl.constexpr(2)
BONUS_DRAW: tl.constexpr = tl.constexpr(3)
FIXED_SCALE: tl.constexpr = tl.constexpr(1099511627776.0)  # 2^40


@triton.jit
def _softmax_stats(ptr, off, V, temperature, IS_LOGITS: tl.constexpr, BLOCK: tl.constexpr):
    """(max, sum exp((l - max) / T)) of a logits row; (0, 1) for a probability row."""
    m = tl.full((), 0.0, tl.float32)
    s = tl.full((), 1.0, tl.float32)
    if IS_LOGITS:
        m = tl.full((), -float("inf"), tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + off + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            m = tl.maximum(m, tl.max(x, axis=0))
        s = tl.full((), 0.0, tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + off + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            s += tl.sum(tl.where(cols < V, tl.exp((x - m) / temperature), 0.0), axis=0)
    return m, s


@triton.jit
def _probs(ptr, off, cols, mask, m, s, temperature, IS_LOGITS: tl.constexpr):
    x = tl.load(ptr + off + cols, mask=mask, other=0.0).to(tl.float32)
    if IS_LOGITS:
        x = tl.exp((x - m) / temperature) / s
    return tl.where(mask, x, 0.0)


@triton.jit
def _argmax(ptr, off, V, BLOCK: tl.constexpr):
    """Lowest index of the row maximum (NaN never wins)."""
    best = tl.full((), -float("inf"), tl.float32)
    best_idx = tl.zeros((), tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        x = tl.load(ptr + off + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        bmax = tl.max(x, axis=0)
        bidx = tl.min(tl.where(x == bmax, cols, V), axis=0)
        better = bmax > best
        best_idx = tl.where(better, bidx, best_idx)
        best = tl.where(better, bmax, best)
    return tl.minimum(best_idx, V - 1)


@triton.jit
def _entropy(ptr, off, V, m, s, temperature, IS_LOGITS: tl.constexpr, BLOCK: tl.constexpr):
    h = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        p = _probs(ptr, off, cols, cols < V, m, s, temperature, IS_LOGITS)
        h -= tl.sum(tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0), axis=0)
    return h


@triton.jit
def _fixed(w):
    w = tl.where(w > 0, tl.minimum(w, 1.0), 0.0)  # NaN -> 0
    return (w * FIXED_SCALE).to(tl.int64)


@triton.jit
def _weights(tgt, t_off, drf, d_off, cols, V, x, tm, ts, dm, ds, temperature, residual,
             TARGET_LOGITS: tl.constexpr, DRAFT_LOGITS: tl.constexpr, HAS_DRAFT: tl.constexpr):
    """Fixed-point weights of max(0, p - q) (residual) or of p (q is then never read), for one tile."""
    mask = cols < V
    p = _probs(tgt, t_off, cols, mask, tm, ts, temperature, TARGET_LOGITS)
    if HAS_DRAFT:
        q = _probs(drf, d_off, cols, cols < tl.where(residual, V, 0), dm, ds, temperature, DRAFT_LOGITS)
    else:
        q = tl.where(cols == tl.where(residual, x, -1), 1.0, 0.0)
    return _fixed(p - q)


@triton.jit
def _sample(tgt, t_off, drf, d_off, V, x, tm, ts, dm, ds, temperature, u, residual,
            TARGET_LOGITS: tl.constexpr, DRAFT_LOGITS: tl.constexpr, HAS_DRAFT: tl.constexpr,
            BLOCK: tl.constexpr):
    """Inverse CDF: the number of inclusive prefix sums <= int64(u * total); -1 if the total is 0."""
    total = tl.zeros((), tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        total += tl.sum(_weights(tgt, t_off, drf, d_off, cols, V, x, tm, ts, dm, ds, temperature, residual,
                                 TARGET_LOGITS, DRAFT_LOGITS, HAS_DRAFT), axis=0)
    u = tl.where((u >= 0) & (u < 1), u, 0.0)
    thr = tl.minimum((u.to(tl.float64) * total.to(tl.float64)).to(tl.int64), total - 1)
    count = tl.zeros((), tl.int64)
    running = tl.zeros((), tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        w = _weights(tgt, t_off, drf, d_off, cols, V, x, tm, ts, dm, ds, temperature, residual,
                     TARGET_LOGITS, DRAFT_LOGITS, HAS_DRAFT)
        cums = tl.cumsum(w, axis=0) + running
        count += tl.sum((cums <= thr).to(tl.int64), axis=0)
        running += tl.sum(w, axis=0)
    return tl.where(total > 0, tl.minimum(count, V - 1), -1)


@triton.jit
def _draw(uniforms, u_plane, u_sb, u_sk, b, t0, i, seed_lo, seed_hi, stream, plane: tl.constexpr, purpose,
          HAS_UNIFORMS: tl.constexpr):
    if HAS_UNIFORMS:
        u = tl.load(uniforms + plane * u_plane + b * u_sb + (t0 + i) * u_sk)
    else:
        idx = tl.full((1,), 0, tl.int64) + i
        u = tl.max(philox_uniform(seed_lo, seed_hi, idx, stream, purpose), axis=0)
    return u


@triton.jit
def spec_chain_kernel(
    out_tokens, out_num, cu, ids, ids_sb, ids_sk, tgt, t_sb, t_sk, drf, d_sb, d_sk,
    uniforms, u_plane, u_sb, u_sk, seeds, seed_lo, seed_hi,
    V, width, num_draft, temperature, eps, delta,
    MODE: tl.constexpr, RAGGED: tl.constexpr, HAS_DRAFT: tl.constexpr, TARGET_LOGITS: tl.constexpr,
    DRAFT_LOGITS: tl.constexpr, HAS_UNIFORMS: tl.constexpr, HAS_SEEDS: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    # Request span, clamped like the C++ kernels so that inconsistent cu values stay in bounds.
    if RAGGED:
        lo = tl.minimum(tl.maximum(tl.load(cu + b).to(tl.int64), 0), num_draft)
        hi = tl.minimum(tl.maximum(tl.load(cu + b + 1).to(tl.int64), lo), num_draft)
        d0 = lo
        t0 = lo + b
        count = tl.minimum(hi - lo, width - 1)
    else:
        d0 = tl.zeros((), tl.int64)
        t0 = tl.zeros((), tl.int64)
        count = tl.minimum(num_draft, width - 1).to(tl.int64)
    if HAS_SEEDS:
        key = tl.load(seeds + b)
        s_lo = (key & 0xFFFFFFFF).to(tl.uint32)
        s_hi = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
        stream = 0
    else:
        s_lo = seed_lo.to(tl.uint32)
        s_hi = seed_hi.to(tl.uint32)
        stream = b.to(tl.uint32)

    accepted = tl.zeros((), tl.int64)
    rejected = tl.full((), -1, tl.int64)
    done = tl.zeros((), tl.int32)
    for i in range(0, count):
        if done == 0:
            x = tl.load(ids + b * ids_sb + (d0 + i) * ids_sk).to(tl.int64)
            valid = (x >= 0) & (x < V)
            xs = tl.where(valid, x, 0)
            t_off = b * t_sb + (t0 + i) * t_sk
            if MODE == GREEDY:
                ok = x == _argmax(tgt, t_off, V, BLOCK)
            else:
                tm, ts = _softmax_stats(tgt, t_off, V, temperature, TARGET_LOGITS, BLOCK)
                px = _probs(tgt, t_off, xs, valid, tm, ts, temperature, TARGET_LOGITS)
                if MODE == TYPICAL:
                    h = _entropy(tgt, t_off, V, tm, ts, temperature, TARGET_LOGITS, BLOCK)
                    ok = px > tl.minimum(eps, delta * tl.exp(-h))
                else:
                    qx = 1.0
                    if HAS_DRAFT:
                        d_off = b * d_sb + (d0 + i) * d_sk
                        dm, ds = _softmax_stats(drf, d_off, V, temperature, DRAFT_LOGITS, BLOCK)
                        qx = _probs(drf, d_off, xs, valid, dm, ds, temperature, DRAFT_LOGITS)
                    u = _draw(uniforms, u_plane, u_sb, u_sk, b, t0, i, s_lo, s_hi, stream, 0, ACCEPT_DRAW,
                              HAS_UNIFORMS)
                    ok = u * qx < px
            ok = ok & valid
            accepted = tl.where(ok, accepted + 1, accepted)
            rejected = tl.where(ok, rejected, tl.where(valid, x, -1))
            done = tl.where(ok, done, 1)

    t_off = b * t_sb + (t0 + accepted) * t_sk
    if MODE == REJECTION:
        tm, ts = _softmax_stats(tgt, t_off, V, temperature, TARGET_LOGITS, BLOCK)
        is_residual = accepted < count
        d_off = b * d_sb + (d0 + tl.minimum(accepted, tl.maximum(count - 1, 0))) * d_sk
        dm = tl.full((), 0.0, tl.float32)
        ds = tl.full((), 1.0, tl.float32)
        if HAS_DRAFT:
            if is_residual:
                dm, ds = _softmax_stats(drf, d_off, V, temperature, DRAFT_LOGITS, BLOCK)
        purpose = tl.where(is_residual, RESIDUAL_DRAW, BONUS_DRAW)
        u = _draw(uniforms, u_plane, u_sb, u_sk, b, t0, accepted, s_lo, s_hi, stream, 1, purpose, HAS_UNIFORMS)
        final = _sample(tgt, t_off, drf, d_off, V, rejected, tm, ts, dm, ds, temperature, u, is_residual,
                        TARGET_LOGITS, DRAFT_LOGITS, HAS_DRAFT, BLOCK)
        if final < 0:  # max(0, p - q) is all zero: fall back to p
            final = _sample(tgt, t_off, drf, d_off, V, rejected, tm, ts, dm, ds, temperature, u, is_residual & False,
                            TARGET_LOGITS, DRAFT_LOGITS, HAS_DRAFT, BLOCK)
        final = tl.where(final < 0, V - 1, final)
    else:
        final = _argmax(tgt, t_off, V, BLOCK)

    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK).to(tl.int64)
        xs = tl.load(ids + b * ids_sb + (d0 + cols) * ids_sk, mask=cols < accepted, other=-1).to(tl.int64)
        tok = tl.where(cols < accepted, xs, tl.where(cols == accepted, final, -1))
        tl.store(out_tokens + b * width + cols, tok.to(tl.int32), mask=cols < width)
    tl.store(out_num + b, accepted.to(tl.int32))


def spec_chain(out_tokens, out_num, cu, ids, ids_strides, tgt, t_strides, drf, d_strides, uniforms, u_strides,
               seeds, seed, vocab, width, num_draft, temperature, eps, delta, mode, target_logits, draft_logits):
    """Launch one program per request. Absent tensors (cu, drf, uniforms, seeds) are None."""
    block = min(1024, triton.next_power_of_2(max(vocab, width)))
    dummy = tgt
    spec_chain_kernel[(out_tokens.shape[0],)](
        out_tokens, out_num, dummy if cu is None else cu, ids, *ids_strides, tgt, *t_strides,
        dummy if drf is None else drf, *d_strides, dummy if uniforms is None else uniforms, *u_strides,
        dummy if seeds is None else seeds, seed & 0xFFFFFFFF, seed >> 32,
        vocab, width, num_draft, temperature, eps, delta,
        MODE=mode, RAGGED=cu is not None, HAS_DRAFT=drf is not None, TARGET_LOGITS=target_logits,
        DRAFT_LOGITS=draft_logits, HAS_UNIFORMS=uniforms is not None, HAS_SEEDS=seeds is not None, BLOCK=block,
        enable_fp_fusion=False,
    )


def _aot(mode, ragged, has_draft, logits, tdtype, has_uniforms=False):
    sig = {"out_tokens": "*i32", "out_num": "*i32", "cu": "*i32", "ids": "*i64", "ids_sb": "i64", "ids_sk": "i64",
           "tgt": f"*{tdtype}", "t_sb": "i64", "t_sk": "i64", "drf": f"*{tdtype}", "d_sb": "i64", "d_sk": "i64",
           "uniforms": "*fp32", "u_plane": "i64", "u_sb": "i64", "u_sk": "i64", "seeds": "*i64", "seed_lo": "i64",
           "seed_hi": "i64", "V": "i64", "width": "i64", "num_draft": "i64", "temperature": "fp32", "eps": "fp32",
           "delta": "fp32"}
    constexprs = {"MODE": mode, "RAGGED": ragged, "HAS_DRAFT": has_draft, "TARGET_LOGITS": logits,
                  "DRAFT_LOGITS": logits, "HAS_UNIFORMS": has_uniforms, "HAS_SEEDS": ragged, "BLOCK": 1024}
    return spec_chain_kernel, sig, constexprs


AOT_SPECS = [
    _aot(0, False, False, False, "fp32"),
    _aot(0, True, False, True, "bf16"),
    _aot(1, False, True, False, "fp32"),
    _aot(1, True, True, True, "bf16"),
    _aot(1, True, False, False, "fp16"),
    _aot(1, False, True, False, "fp32", has_uniforms=True),
    _aot(2, False, False, True, "bf16"),
]

"""Plain-torch references for chain verification of speculative drafts: the specification of
``pyfuse.spec.verify_greedy``, ``rejection_sample`` and ``typical_accept``.

Every function takes the layouts of the public API (padded, or ragged with ``cu_num_draft_tokens``),
gathers each request into a padded working form and then decides all requests at once:

* ``ids [B, W-1]`` draft ids, -1 where a request has fewer drafts or the id is outside ``[0, V)``;
* ``n [B]`` draft count per request; ``p [B, W, V]`` target probabilities (row ``n[b]`` is the bonus row);
* ``q [B, W-1, V]`` draft probabilities or None (one-hot draft).

Sampling a recovered or bonus token is an inverse CDF over fixed-point weights
``int64(clamp(w, 0, 1) * 2**40)`` with threshold ``int64(float64(u) * float64(total))``: integer prefix
sums are exact in any order, so every backend reproduces it bit for bit from the same uniform.
"""
from __future__ import annotations

import torch

from .philox import philox_torch, uint_to_uniform_torch

MASK32 = 0xFFFFFFFF
FIXED_SCALE = 2.0**40
ACCEPT_DRAW, RESIDUAL_DRAW, BONUS_DRAW = 1, 2, 3  # Philox purpose words


# ---- layout ---------------------------------------------------------------------------------------------

def _spans(batch, num_draft, width, cu):
    """(draft_row0, target_row0, count) per request, clamped exactly as the kernels clamp them."""
    if cu is None:
        count = min(num_draft, width - 1)
        return [(0, 0, count)] * batch
    cu = [int(v) for v in cu.tolist()]
    spans = []
    for b in range(batch):
        lo = min(max(cu[b], 0), num_draft)
        hi = min(max(cu[b + 1], lo), num_draft)
        spans.append((lo, lo + b, min(hi - lo, width - 1)))
    return spans


def _gather(t, spans, width, row_key):
    """Padded [B, width, ...] view of a per-request-rows tensor (padded input is returned as is)."""
    if t is None or spans is None:
        return t
    out = t.new_zeros((len(spans), width) + tuple(t.shape[1:]))
    for b, span in enumerate(spans):
        r0, count = span[row_key], span[2] + (1 if row_key == 1 else 0)
        out[b, :count] = t[r0:r0 + count]
    return out


def _working_form(draft_token_ids, target, draft, uniforms, cu, width):
    """ids [B, W-1] (-1 = invalid), n [B], target [B, W, V], draft [B, W-1, V] | None, uniforms [2, B, W]."""
    vocab = target.shape[-1]
    if cu is None:
        batch, num_draft = draft_token_ids.shape
        spans = None
        n = torch.full((batch,), min(num_draft, width - 1), dtype=torch.int64)
        ids = draft_token_ids.to(torch.int64)
    else:
        batch, num_draft = cu.shape[0] - 1, draft_token_ids.shape[0]
        spans = _spans(batch, num_draft, width, cu)
        n = torch.tensor([s[2] for s in spans], dtype=torch.int64)
        ids = _gather(draft_token_ids.to(torch.int64), spans, width - 1, 0)
    ids = ids[:, : width - 1]
    n = n.to(ids.device)
    live = torch.arange(width - 1, device=ids.device) < n[:, None]
    ids = torch.where(live & (ids >= 0) & (ids < vocab), ids, -1)
    target = _gather(target, spans, width, 1)
    draft = _gather(draft, spans, width - 1, 0)
    if uniforms is not None:
        uniforms = torch.stack([_gather(u, spans, width, 1) for u in uniforms]) if spans else uniforms
    return ids, n, target, draft, uniforms


def _empty_output(batch, width, device):
    return (torch.full((batch, width), -1, dtype=torch.int32, device=device),
            torch.zeros(batch, dtype=torch.int32, device=device))


def _assemble(ids, accepted, final):
    """token_ids [B, W]: accepted draft ids, the final token, then -1."""
    batch, k = ids.shape
    pos = torch.arange(k + 1, device=ids.device)
    padded_ids = torch.cat([ids, ids.new_full((batch, 1), -1)], dim=1)
    tokens = torch.where(pos < accepted[:, None], padded_ids, -1)
    tokens = torch.where(pos == accepted[:, None], final[:, None], tokens)
    return tokens.to(torch.int32), accepted.to(torch.int32)


def _accepted_prefix(ok):
    """Length of the all-True prefix of each row of ok [B, K]."""
    return ok.to(torch.int64).cumprod(dim=1).sum(dim=1)


# ---- per-row math ---------------------------------------------------------------------------------------

def softmax(logits, temperature):
    """softmax(l / T) computed as the kernels do: exp((l - max) / T) / sum."""
    x = logits.float()
    e = torch.exp((x - x.amax(dim=-1, keepdim=True)) / temperature)
    return e / e.sum(dim=-1, keepdim=True)


def as_probs(t, is_logits, temperature):
    return softmax(t, temperature) if is_logits else t.float()


def entropy(p):
    """-sum p log p over p > 0, in float32."""
    return -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum(dim=-1)


def fixed_weights(w):
    w = torch.where(w > 0, w.clamp(max=1.0), 0.0)  # NaN -> 0
    return (w * FIXED_SCALE).to(torch.int64)


def inverse_cdf(weights, u):
    """First index whose inclusive prefix sum exceeds int64(u * total); -1 for rows of zero total."""
    total = weights.sum(dim=-1)
    u = torch.where((u >= 0) & (u < 1), u, 0.0)
    thr = torch.minimum((u.double() * total.double()).to(torch.int64), total - 1)
    idx = (weights.cumsum(dim=-1) <= thr[:, None]).sum(dim=-1)
    return torch.where(total > 0, idx.clamp(max=weights.shape[-1] - 1), -1)


def sample_final(p_row, q_row, u):
    """Token from normalised max(0, p - q) (q = 0 for the bonus row), falling back to p when that is all
    zero; always in [0, V)."""
    tok = inverse_cdf(fixed_weights(p_row - q_row), u)
    tok = torch.where(tok < 0, inverse_cdf(fixed_weights(p_row), u), tok)
    return torch.where(tok < 0, p_row.shape[-1] - 1, tok)


def philox_uniforms(seed, seeds, batch, width, n):
    """[2, B, W] uniforms: plane 0 accept draws, plane 1 recovered (position < n) or bonus draws.
    Key = seeds[b] with stream 0 (per-request seeds), or seed with stream b."""
    pos = torch.arange(width, dtype=torch.int64).expand(batch, width)
    if seeds is not None:
        key = seeds.to(torch.int64).cpu()[:, None]
        k0, k1 = key & MASK32, (key >> 32) & MASK32
        stream = torch.zeros(batch, 1, dtype=torch.int64)
    else:
        seed %= 1 << 64
        k0, k1 = seed & MASK32, seed >> 32
        stream = torch.arange(batch, dtype=torch.int64)[:, None]

    def draw(purpose):
        purpose = torch.as_tensor(purpose, dtype=torch.int64).expand(batch, width)
        return uint_to_uniform_torch(philox_torch(pos, torch.zeros_like(pos), stream.expand(batch, width), purpose, k0, k1)[0])

    sample_purpose = torch.where(pos < n.cpu()[:, None], RESIDUAL_DRAW, BONUS_DRAW)
    return torch.stack([draw(ACCEPT_DRAW), draw(sample_purpose)])


# ---- ops ------------------------------------------------------------------------------------------------

def verify_greedy(draft_token_ids, target_logits, cu_num_draft_tokens, max_draft_len):
    """Accept the longest prefix equal to the target argmax (lowest index on ties), then the target argmax
    at the first mismatch (correction) or at the bonus row."""
    width = max_draft_len + 1
    ids, n, target, _, _ = _working_form(draft_token_ids, target_logits, None, None, cu_num_draft_tokens, width)
    if ids.shape[0] == 0:
        return _empty_output(0, width, target_logits.device)
    best = target.float().argmax(dim=-1)  # [B, W]
    accepted = _accepted_prefix((ids >= 0) & (ids == best[:, :-1]))
    final = best.gather(1, accepted[:, None])[:, 0]
    return _assemble(ids, accepted, final)


def typical_accept(draft_token_ids, target, target_is_logits, temperature, eps, delta, cu_num_draft_tokens,
                   max_draft_len):
    """Medusa: accept x while p(x) > min(eps, delta * exp(-H(p))); then the target argmax (lossy)."""
    width = max_draft_len + 1
    ids, n, target, _, _ = _working_form(draft_token_ids, target, None, None, cu_num_draft_tokens, width)
    if ids.shape[0] == 0:
        return _empty_output(0, width, target.device)
    p = as_probs(target, target_is_logits, temperature)
    px = p[:, :-1].gather(2, ids.clamp(min=0)[..., None])[..., 0]
    threshold = torch.clamp(delta * torch.exp(-entropy(p[:, :-1])), max=eps)
    accepted = _accepted_prefix((ids >= 0) & (px > threshold))
    final = target.float().argmax(dim=-1).gather(1, accepted[:, None])[:, 0]
    return _assemble(ids, accepted, final)


def rejection_sample(draft_token_ids, target, draft, target_is_logits, draft_is_logits, temperature,
                     cu_num_draft_tokens, max_draft_len, seed, seeds, uniforms):
    """Leviathan/Chen rejection sampling: accept x_i while u_i * q_i(x_i) < p_i(x_i); at the first rejection
    emit a token from normalised max(0, p - q), or the bonus token from p when every draft is accepted.
    ``uniforms`` [2, *target.shape[:-1]] replaces the Philox draws when given."""
    width = max_draft_len + 1
    ids, n, target, draft, uniforms = _working_form(draft_token_ids, target, draft, uniforms,
                                                    cu_num_draft_tokens, width)
    batch = ids.shape[0]
    if batch == 0:
        return _empty_output(0, width, target.device)
    p = as_probs(target, target_is_logits, temperature)
    q = None if draft is None else as_probs(draft, draft_is_logits, temperature)
    u = (uniforms.float() if uniforms is not None else philox_uniforms(seed, seeds, batch, width, n)).to(p.device)
    return rejection_core(ids, n, p, q, u[0], u[1])


def rejection_core(ids, n, p, q, u_accept, u_sample):
    """The decision on the working form; the statistical tests derive their broken variants from it."""
    batch, k = ids.shape
    x = ids.clamp(min=0)
    px = p[:, :k].gather(2, x[..., None])[..., 0]
    qx = torch.ones_like(px) if q is None else q.gather(2, x[..., None])[..., 0]
    accepted = _accepted_prefix((ids >= 0) & (u_accept[:, :k] * qx < px))
    rows = torch.arange(batch, device=ids.device)
    rejected = accepted < n
    p_row = p[rows, accepted]
    at = accepted.clamp(max=max(k - 1, 0))
    if k == 0:
        q_row = torch.zeros_like(p_row)
    elif q is None:
        x_rej = ids[rows, at]
        q_row = torch.zeros_like(p_row)
        q_row[rows[x_rej >= 0], x_rej[x_rej >= 0]] = 1.0
    else:
        q_row = q[rows, at]
    q_row = torch.where(rejected[:, None], q_row, 0.0)
    final = sample_final(p_row, q_row, u_sample[rows, accepted])
    return _assemble(ids, accepted, final)

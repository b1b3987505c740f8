"""Reference for ``pyfuse.spec.verify_tree``: the per-row tree walk in plain torch, one row at a time.

This is the specification the cpu, cuda and triton backends must match bit for bit. To make that possible
without a shared floating-point reduction order, probabilities become fixed-point integer weights
``w = trunc(clamp(p, 0, 1) * 2**32)`` (NaN -> 0), whose int64 sums are exact in any order; the few remaining
float steps are single IEEE double operations (no FMA partner), identical on every backend.

Tree layout (SGLang/EAGLE): node 0 is the root (the last verified token); ``next_token[i]`` is the first child
of node i, ``next_sibling[i]`` the next child of i's parent; -1 ends a list. A child index outside [1, N) also
ends the list, a sibling list is cut after N - 1 entries and the walk after ``max_depth`` levels, so malformed
trees cannot loop (the public function rejects them before this runs).

Target / draft row i is the distribution of the token that follows node i (the children of i were drafted
from draft row i). Modes, at the current node with children c_1..c_S in sibling order:

- greedy: accept the first child whose token is argmax(target row) (first index of the maximum, NaN ignored).
- target_only (SGLang, thresholds 1): one coin u = uniforms[cur]; accumulate the target weight of each new
  child token; accept child k when u * P < acc_k. Final draw from the target with the tried tokens removed.
- stochastic (SpecInfer/EAGLE recursive rejection; siblings assumed drafted i.i.d. from the draft row): with
  residual r (starting at the target), accept child c (token x) when u_c * q(x) < r(x), u_c = uniforms[c];
  otherwise r <- norm(max(r - q, 0)). Final draw from the last residual. Rows are normalised by multiplying
  with the double reciprocal of their integer total.

Final draw (correction after a rejection, or bonus at a leaf / at max_depth): the first token x whose
cumulative weight exceeds u * total, u = final_uniforms[b]. An all-zero residual falls back to the target row,
an all-zero target row to token 0, so every emitted id is in [0, V).
"""
from __future__ import annotations

import torch

MODES = ("greedy", "target_only", "stochastic")
SCALE = float(1 << 32)


def weights(row: torch.Tensor) -> torch.Tensor:
    """Fixed-point int64 weights of a probability row: trunc(clamp(p, 0, 1) * 2**32), NaN -> 0."""
    p = row.float()
    p = torch.where(p > 0, p.clamp(max=1.0), torch.zeros_like(p))
    return (p * SCALE).to(torch.int64)


def reciprocal(total: int) -> float:
    """1 / total, 0 for an empty distribution: rows are normalised by this multiplier (kernels avoid a
    division per token)."""
    return 1.0 / total if total > 0 else 0.0


def residual(w: torch.Tensor, inv: float, wq: torch.Tensor, q_inv: float) -> torch.Tensor:
    """Weights of max(w * inv - wq * q_inv, 0), re-quantised to 2**32."""
    r = (w.double() * inv - wq.double() * q_inv).clamp(min=0.0)
    return (r * SCALE).to(torch.int64)


def sample(w: torch.Tensor, u: float) -> int:
    """First index whose cumulative weight exceeds u * sum(w) (sum(w) > 0); the last index when none does,
    which only an invalid injected uniform (>= 1 or NaN) can cause."""
    threshold = float(u) * float(w.sum())
    return min(int((~(torch.cumsum(w, 0).double() > threshold)).sum()), w.numel() - 1)


def greedy_argmax(row: torch.Tensor) -> int:
    """First index of the maximum; NaN never wins; an all-NaN/-inf row gives 0."""
    return int(torch.nan_to_num(row.float(), nan=float("-inf")).argmax())


def children(first: list[int], sibling: list[int], node: int) -> list[int]:
    n = len(first)
    out = []
    c = first[node]
    while 0 < c < n and len(out) < n - 1:
        out.append(c)
        c = sibling[c]
    return out


def _walk_row(cand, first, sibling, target, draft, mode, max_depth, u, u_final):
    """Returns (path of node indices starting at 0, emitted token ids)."""
    vocab = target.shape[-1]
    path = [0]
    cur = 0
    rejected = None  # final residual weights when the walk ended on a rejection
    for _ in range(max_depth):
        kids = children(first, sibling, cur)
        if not kids:
            break
        found = None
        if mode == "greedy":
            best = greedy_argmax(target[cur])
            found = next((c for c in kids if cand[c] == best), None)
        elif mode == "target_only":
            w = weights(target[cur])
            threshold = float(u[cur]) * float(w.sum())
            acc = 0
            tried = []
            for c in kids:
                x = cand[c]
                if 0 <= x < vocab and x not in tried:
                    acc += int(w[x])
                    tried.append(x)
                    if threshold < acc:  # only a fresh in-vocabulary candidate is ever accepted
                        found = c
                        break
            if found is None:
                rejected = w.clone()
                rejected[tried] = 0
        else:
            w = weights(target[cur])
            wq = weights(draft[cur])
            q_inv = reciprocal(int(wq.sum()))
            for c in kids:
                x = cand[c]
                inv = reciprocal(int(w.sum()))
                if 0 <= x < vocab and inv > 0:
                    if float(u[c]) * (float(wq[x]) * q_inv) < float(w[x]) * inv:
                        found = c
                        break
                w = residual(w, inv, wq, q_inv)
            if found is None:
                rejected = w
        if found is None:
            break
        path.append(found)
        cur = found
    tokens = [cand[c] for c in path[1:]]
    if mode == "greedy":
        tokens.append(greedy_argmax(target[cur]))
        return path, tokens
    w = rejected if rejected is not None and int(rejected.sum()) > 0 else weights(target[cur])
    tokens.append(sample(w, u_final) if int(w.sum()) > 0 else 0)
    return path, tokens


def verify_tree(candidates, next_token, next_sibling, target, draft, mode: str, max_depth: int, uniforms,
                final_uniforms):
    """Returns (accept_index, accept_len, token_ids, bonus) as in ``pyfuse.spec.verify_tree``; uniforms
    ``[B, N]`` and ``final_uniforms [B]`` are float32 (ignored in greedy mode)."""
    batch, n = candidates.shape
    width = max_depth + 1
    accept_index = torch.full((batch, width), -1, dtype=torch.int32)
    token_ids = torch.full((batch, width), -1, dtype=torch.int32)
    accept_len = torch.zeros(batch, dtype=torch.int32)
    bonus = torch.zeros(batch, dtype=torch.int32)
    for b in range(batch):
        u = uniforms[b].tolist() if uniforms is not None else None
        uf = float(final_uniforms[b]) if final_uniforms is not None else None
        path, tokens = _walk_row(candidates[b].tolist(), next_token[b].tolist(), next_sibling[b].tolist(),
                                 target[b], None if draft is None else draft[b], mode, max_depth, u, uf)
        accept_index[b, : len(path)] = torch.tensor(path, dtype=torch.int32)
        token_ids[b, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
        accept_len[b] = len(path) - 1
        bonus[b] = tokens[-1]
    device = candidates.device
    return accept_index.to(device), accept_len.to(device), token_ids.to(device), bonus.to(device)

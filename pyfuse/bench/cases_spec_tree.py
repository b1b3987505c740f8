"""Benchmark cases for tree verification (``pyfuse.spec.verify_tree``).

Peer ``torch.walk``: a plain-torch tree walk batched over requests as one would write it without a kernel (no
host sync): per depth, scan the sibling lists of every request's current node with tensor ops; greedy
compares against the target argmax, target_only accumulates one coin over the siblings (SGLang), stochastic
tests ``u * q(x) < r(x)`` and replaces the residual by norm(max(r - q, 0)) on every rejection; the final
token comes from ``torch.multinomial`` of the residual.

Trees: EAGLE-like, ``branch`` children per node for ``depth`` levels (N = 1 + branch + branch^2 + ...);
drafts drawn from the draft rows, targets close to the drafts (realistic acceptance). float32 probabilities.
"""
from __future__ import annotations

import torch

from pyfuse.bench.registry import BenchCase, backend_providers, register_cases
from pyfuse.spec import verify_tree

SEED = 1234


def torch_tree_walk(cand, first, sib, target, draft, mode: str, max_depth: int):
    """Plain-torch batched tree walk; returns (accept_len [B], bonus [B])."""
    batch, n, vocab = target.shape
    rows = torch.arange(batch, device=cand.device)
    cur = torch.zeros(batch, dtype=torch.int64, device=cand.device)
    depth = torch.zeros_like(cur)
    alive = torch.ones(batch, dtype=torch.bool, device=cand.device)
    residual = target[:, 0].clone()
    for _ in range(max_depth):
        p = target[rows, cur]
        q = draft[rows, cur] if draft is not None else None
        residual = p.clone()
        child = first[rows, cur]
        found = torch.full_like(cur, -1)
        coin = torch.rand(batch, device=cand.device)
        acc = torch.zeros(batch, device=cand.device)
        best = p.argmax(-1)
        for _ in range(n - 1):  # at most N - 1 siblings
            live = alive & (child >= 0) & (found < 0)
            c = child.clamp(min=0)
            x = cand[rows, c]
            if mode == "greedy":
                ok = x == best
            elif mode == "target_only":
                acc = acc + torch.where(live, residual[rows, x], 0)
                ok = coin < acc
                residual[rows, x] = torch.where(live & ~ok, 0.0, residual[rows, x])
            else:
                u = torch.rand(batch, device=cand.device)
                ok = u * q[rows, x] < residual[rows, x]
                r = (residual - q).clamp(min=0)
                r = r / r.sum(-1, keepdim=True).clamp(min=1e-30)
                residual = torch.where((live & ~ok)[:, None], r, residual)
            found = torch.where(live & ok, child, found)
            child = torch.where(live & ~ok, sib[rows, c], -1)
        alive = alive & (found >= 0)
        cur = torch.where(alive, found, cur)
        depth = depth + alive.long()
    final_p = target[rows, cur]
    if mode == "greedy":
        return depth, final_p.argmax(-1)
    final = torch.where(alive[:, None], final_p, residual)
    return depth, torch.multinomial(final, 1)[:, 0]


def _tree(branch: int, depth: int):
    """First-child / next-sibling arrays of a full tree with `branch` children per node, BFS numbering."""
    first, sib, level = [-1], [-1], [0]
    for _ in range(depth):
        nxt = []
        for parent in level:
            kids = list(range(len(first), len(first) + branch))
            first[parent] = kids[0]
            first += [-1] * branch
            sib += kids[1:] + [-1]
            nxt += kids
        level = nxt
    return first, sib


def _inputs(batch, branch, depth, vocab, device):
    g = torch.Generator().manual_seed(SEED)
    first, sib = _tree(branch, depth)
    n = len(first)
    parent = [0] * n
    for node in range(n):
        c = first[node]
        while c != -1:
            parent[c] = node
            c = sib[c]
    draft_logits = torch.randn(batch, n, vocab, generator=g) * 3
    draft = torch.softmax(draft_logits, -1)
    target = torch.softmax(draft_logits + torch.randn(batch, n, vocab, generator=g), -1)
    cand = torch.zeros(batch, n, dtype=torch.int64)
    for i in range(1, n):
        cand[:, i] = torch.multinomial(draft[:, parent[i]], 1, generator=g)[:, 0]
    nt, ns = torch.tensor([first] * batch), torch.tensor([sib] * batch)
    return [t.to(device) for t in (cand, nt, ns, target, draft)]


def _case(batch, branch, depth, vocab, mode, device):
    cand, nt, ns, target, draft = _inputs(batch, branch, depth, vocab, device)
    d = draft if mode == "stochastic" else None

    def run(backend):
        return lambda: verify_tree(cand, nt, ns, target, mode=mode, draft_probs=d, seed=SEED, validate=False,
                                   backend=backend)

    providers, skipped = backend_providers(device, run)
    providers["pyfuse:validate"] = lambda: verify_tree(cand, nt, ns, target, mode=mode, draft_probs=d, seed=SEED)
    providers["torch.walk"] = lambda: torch_tree_walk(cand, nt, ns, target, d, mode, depth)
    if batch <= 8:  # the reference walks row by row in Python
        providers["reference"] = run("reference")
    # Floor: every request reads at least its root's target row (plus the draft row when stochastic).
    rows = 2 if mode == "stochastic" else 1
    floor = batch * rows * vocab * target.element_size()
    return BenchCase(family="spec_tree", op="verify_tree",
                     params=f"B={batch} N={nt.shape[1]} (branch {branch} depth {depth}) V={vocab} {mode}",
                     bytes_floor=floor, providers=providers, peers=("torch.walk",), skipped=skipped)


@register_cases("spec_tree")
def cases(device, quick):
    shapes = [(8, 2, 3, 32000)] if quick else [(8, 2, 3, 32000), (64, 2, 3, 32000), (16, 3, 2, 128256)]
    for batch, branch, depth, vocab in shapes:
        for mode in ("greedy", "target_only", "stochastic"):
            yield _case(batch, branch, depth, vocab, mode, device)

"""Reference for ``pyfuse::merge_task_vectors``: the specification of the fused merge, in plain torch.

Per model i (all arithmetic float32, models in index order):

    d_i   = x_i - base                      (x_i itself when base is None)
    keep_i = SELECT(d_i)                    magnitude / breadcrumbs / random / della / none
    m_i   = keep_i ? d_i : 0
    c_i   = RESCALE(d_i, m_i)               1, 1/density, or L1(d_i)/L1(m_i) (1 when either < 1e-7)
    v_i   = (w_i * c_i) * m_i               the weighted, rescaled task vector
    e_i   = v_i (weighted election) or c_i * m_i (unweighted)
    s     = sign election over e            "sum": sum_i e_i >= 0; "count": sum_i sign(e_i) >= 0 (ties +)
    a_i   = sign(e_i) == s                  zeros never agree; every model agrees without consensus
    out   = base + lam * (sum_i a_i v_i) / Q

Q: "agree_weight" sum_i a_i w_i (0 -> 1), "agree_count" max(sum_i a_i, 1), "all_weight" sum_i w_i
(|Q| < 1e-8 -> 1), "none" 1. Selection ties go to the lowest flat index (``argsort(stable=True)``);
NaN magnitudes count as the largest. Random numbers: the packed Philox uniform u of element j (word j % 4 of
counter (j // 4, stream=i, purpose)) and an element is kept iff u < p. The per-model parameters come from
``pyfuse.merge.op.plan``.
"""
from __future__ import annotations

import torch

from pyfuse.reference.philox import packed_rand_torch


def top_mask(d: torch.Tensor, k: int) -> torch.Tensor:
    """Flat bool mask of the k largest |d|, ties to the lowest index."""
    order = torch.argsort(d.abs().reshape(-1), descending=True, stable=True)
    mask = torch.zeros(d.numel(), dtype=torch.bool, device=d.device)
    mask[order[:k]] = True
    return mask


def della_keep_prob(d: torch.Tensor, lo: float, span: float) -> torch.Tensor:
    """Keep probability lo + span * rank / (ncols - 1) per element, rank = ascending stable rank of |d|
    within its row (1-D tensors are one row). All steps rounded to float32 like the kernels."""
    rows = d.reshape(1, -1) if d.dim() < 2 else d
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(rows.shape[1], device=d.device).expand_as(order))
    ncols = rows.shape[1]
    t = rank.to(torch.float32) / float(max(ncols - 1, 1))
    return (torch.tensor(lo, dtype=torch.float32) + t * torch.tensor(span, dtype=torch.float32)).reshape(-1)


def keep_mask(d: torch.Tensor, i: int, sparsify: str, p: dict, seed: int) -> torch.Tensor:
    """Flat bool mask of the elements of task vector i that survive sparsification."""
    n = d.numel()
    if sparsify == "none" or p["keep_all"][i]:
        return torch.ones(n, dtype=torch.bool, device=d.device)
    if sparsify in ("magnitude", "breadcrumbs"):
        return top_mask(d, p["k_keep"][i]) & ~top_mask(d, p["k_drop"][i])
    index = torch.arange(n, dtype=torch.int64, device=d.device)
    u = packed_rand_torch(seed, index, i, p["purpose"])
    if sparsify == "random":
        prob = torch.full((n,), p["p_keep"][i], dtype=torch.float32, device=d.device)
    else:
        prob = della_keep_prob(d, p["p_keep"][i], p["p_span"][i])
    return u < prob


def merge_task_vectors(base, models, plan: dict, sparsify: str, rescale: str, consensus: str,
                       consensus_weighted: bool, normalize: str, lam: float, seed: int, out_dtype: torch.dtype):
    shape = models[0].shape
    b = base.to(torch.float32).reshape(-1) if base is not None else None
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731  (scalars rounded once, as in C++)
    vs, es = [], []
    for i, x in enumerate(models):
        d = x.to(torch.float32).reshape(-1)
        if b is not None:
            d = d - b
        m = torch.where(keep_mask(d.reshape(shape), i, sparsify, plan, seed), d, torch.zeros_like(d))
        c = f32(plan["scale"][i])
        if rescale == "l1":
            before = d.abs().sum(dtype=torch.float64).item()
            after = m.abs().sum(dtype=torch.float64).item()
            c = f32(1.0 if before < 1e-7 or after < 1e-7 else before / after)
        alpha = f32(plan["weights"][i]) * c
        vs.append(alpha * m)
        es.append(alpha * m if consensus_weighted else c * m)

    zero = torch.zeros_like(vs[0])
    if consensus == "none":
        agree = [torch.ones_like(v, dtype=torch.bool) for v in vs]
    else:
        total = zero.clone()
        for e in es:
            total = total + (e if consensus == "sum" else torch.sign(e))
        positive = total >= 0
        agree = [torch.where(positive, e > 0, e < 0) for e in es]

    acc = zero.clone()
    for a, v in zip(agree, vs):
        acc = acc + torch.where(a, v, zero)
    if normalize == "agree_weight":
        q = zero.clone()
        for a, w in zip(agree, plan["weights"]):
            q = q + torch.where(a, f32(w), f32(0.0))
        acc = acc / torch.where(q == 0, f32(1.0), q)
    elif normalize == "agree_count":
        count = torch.stack(agree).sum(0).clamp(min=1)
        acc = acc / count.to(torch.float32)
    elif normalize == "all_weight":
        acc = acc / f32(plan["all_weight_divisor"])
    out = acc * f32(lam)
    if b is not None:
        out = b + out
    return out.reshape(shape).to(out_dtype)

"""Benchmark cases for the union-vocabulary ops (``pyfuse.ensemble``).

Peers (same logits, same map, mode "prob", absent "zero", equal weights, temperature 1):

* ``torch.scatter_add``: per-model ``softmax`` over the valid ids, ``scatter_add_`` along dim 1 into a
  ``[B, U + 1]`` buffer (ignored ids land in the extra column). The fastest plain-torch formulation measured
  here: on the 2-core reference machine (B=64, 151936 + 128256 ids) ~105 ms, against ~150 ms for ``index_add_``
  along dim 0 of a transposed buffer and ~260 ms for ``index_add_`` along dim 1.
* ``torch.index_add``: the same with ``index_add_`` along dim 1, the way GaC-style code is written without
  sparse tensors (a column add per model id, strided over the rows: 2.5x slower than ``scatter_add_``).
* ``torch.sparse.mm``: GaC's formulation, each model's probabilities times a sparse ``[V_m, U]`` 0/1 mapping
  matrix (``torch.sparse.mm(S_m^T, P_m^T)^T``), summed.
* For ``next_token`` the same three followed by ``argmax``; for ``next_token_sample`` (``greedy=False``: one
  Philox draw per row from the union distribution, by inverse CDF) ``scatter_add`` followed by the same inverse
  CDF in torch (``cumsum`` + ``searchsorted``: B=64 qwen2+llama3 24 ms, where ``torch.multinomial`` takes 490 ms
  and the exponential-race argmax 430 ms); for ``union_topk`` a plain-torch UniTE (per-model
  ``topk``, candidate gather from each model's probabilities scattered into the union, renormalise, combine).

Maps are synthetic (``pyfuse.ensemble.synthetic_map``): 70% of each later model's ids shared with the union
(at random positions), 2% many-to-one, 64 padded ids per model, union ids numbered as ``VocabMap`` numbers
them (model 0's in its id order, then each later model's new ids in its order). The shuffled numbering of
earlier versions (``ordered=False``, a layout ``VocabMap`` never builds) made model 0's gathers random too:
union_probs B=64 qwen2+llama3 6-10% slower with it, plain-torch ``scatter_add_`` 12% slower (same run, min and
median).
"""
from __future__ import annotations

import torch

from pyfuse.bench.registry import BenchCase, backend_providers, register_cases
from pyfuse.ensemble import next_token, synthetic_map, union_probs, union_topk
from pyfuse.ensemble.maps import tables_for

VOCABS = {"llama2+llama3": (32000, 128256), "qwen2+llama3": (151936, 128256),
          "three": (151936, 128256, 32000)}
TOPK = 10


class _TorchPeers:
    """Plain-torch ensemblers for one map on one device (index tensors and sparse matrices built once)."""

    def __init__(self, vmap, device):
        U = vmap.union_size
        self.U, self.M = U, len(vmap.to_union)
        # 0 at mapped ids, -inf at the others: adding it is ~2.5x cheaper than masked_fill with a broadcast
        # [V] mask (measured 20 vs 52 ms for B=64 qwen2+llama3), so the peers pay no avoidable mask cost.
        self.bias = [torch.zeros(f.shape).masked_fill(f < 0, float("-inf")).to(device) for f in vmap.to_union]
        self.index = [torch.where(f >= 0, f, U).long().to(device) for f in vmap.to_union]
        self.sparse = []
        for f in vmap.to_union:
            rows = torch.nonzero(f >= 0).flatten()
            idx = torch.stack([f[rows].long(), rows])  # transposed: [U, V_m]
            self.sparse.append(torch.sparse_coo_tensor(idx, torch.ones(rows.numel()), (U, f.numel()))
                               .coalesce().to(device))

    def probs(self, logits):
        return [torch.softmax(x.float() + b, dim=1) for x, b in zip(logits, self.bias)]

    def scatter_add(self, logits):
        out = torch.zeros(logits[0].shape[0], self.U + 1, device=logits[0].device)
        for p, i in zip(self.probs(logits), self.index):
            out.scatter_add_(1, i.expand(p.shape[0], -1), p / self.M)
        return out[:, :self.U]

    @staticmethod
    def sample(probs):
        """One id per row by inverse CDF: the first id whose running sum exceeds a uniform draw of the total."""
        cdf = probs.cumsum(dim=1)
        u = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).clamp_max(probs.shape[1] - 1)

    def index_add(self, logits):
        out = torch.zeros(logits[0].shape[0], self.U + 1, device=logits[0].device)
        for p, i in zip(self.probs(logits), self.index):
            out.index_add_(1, i, p, alpha=1.0 / self.M)
        return out[:, :self.U]

    def sparse_mm(self, logits):
        out = 0
        for p, s in zip(self.probs(logits), self.sparse):
            out = out + torch.sparse.mm(s, p.t()).t() / self.M
        return out

    def unite(self, logits, k):
        """UniTE: candidates = union of per-model top-k union ids; each model's probability gathered and
        renormalised over the candidates; mean; best k."""
        probs = self.probs(logits)
        cands = torch.cat([i.gather(0, torch.topk(p, k, dim=1).indices.flatten()).view(p.shape[0], k)
                           for p, i in zip(probs, self.index)], dim=1)
        mix = 0
        for p, i in zip(probs, self.index):
            dense = torch.zeros(p.shape[0], self.U + 1, device=p.device).scatter_add_(1, i.expand(p.shape[0], -1), p)
            g = dense.gather(1, cands)
            mix = mix + g / g.sum(dim=1, keepdim=True) / self.M
        best = torch.topk(mix, k, dim=1)
        return best.values, cands.gather(1, best.indices)


@register_cases("ensemble")
def cases(device, quick):
    shapes = [("llama2+llama3", 8)] if quick else [(v, b) for v in VOCABS for b in (1, 8, 64)]
    for vocab, batch in shapes:
        vmap = synthetic_map(VOCABS[vocab])
        tables_for(vmap, device)
        gen = torch.Generator().manual_seed(batch)
        logits = [(torch.randn(batch, v, generator=gen) * 3).to(device) for v in VOCABS[vocab]]
        peers = _TorchPeers(vmap, device)
        read = sum(x.numel() * 4 for x in logits)
        params = f"{vocab} V={'+'.join(map(str, VOCABS[vocab]))} U={vmap.union_size} B={batch} float32"
        for op, make, torch_peers, floor in (
            ("union_probs", lambda b: lambda: union_probs(logits, vmap, backend=b),
             {"torch.scatter_add": lambda: peers.scatter_add(logits), "torch.index_add": lambda: peers.index_add(logits),
              "torch.sparse.mm": lambda: peers.sparse_mm(logits)},
             read + batch * vmap.union_size * 4),
            ("next_token", lambda b: lambda: next_token(logits, vmap, backend=b),
             {"torch.scatter_add": lambda: peers.scatter_add(logits).argmax(dim=1),
              "torch.index_add": lambda: peers.index_add(logits).argmax(dim=1),
              "torch.sparse.mm": lambda: peers.sparse_mm(logits).argmax(dim=1)}, read),
            ("next_token_sample", lambda b: lambda: next_token(logits, vmap, greedy=False, seed=1, backend=b),
             {"torch.scatter_add": lambda: peers.sample(peers.scatter_add(logits))}, read),
            ("union_topk", lambda b: lambda: union_topk(logits, vmap, TOPK, backend=b),
             {"torch.unite": lambda: peers.unite(logits, TOPK)}, read),
        ):
            providers, skipped = backend_providers(device, make)
            if batch == 1:
                providers["reference"] = make("reference")
            else:  # the plain-torch specification takes seconds per call at these sizes
                skipped["reference"] = "timed at B=1 only"
            providers.update(torch_peers)
            yield BenchCase(family="ensemble", op=op, params=params + (f" k={TOPK}" if op == "union_topk" else ""),
                            bytes_floor=floor, providers=providers, peers=tuple(torch_peers), skipped=skipped)

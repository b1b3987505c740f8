"""The plain-torch peers of the ensemble benchmark compute what pyfuse does (equal weights, temperature 1,
mode "prob", absent "zero"), so its speed-ups compare like with like."""
import torch

from pyfuse.bench.cases_ensemble import _TorchPeers
from pyfuse.ensemble import next_token, synthetic_map, union_probs, union_topk


def test_ensemble_peers_match_the_reference():
    vmap = synthetic_map((300, 257, 120), overlap=0.6, many_to_one=0.05, padding=4, seed=2)
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, t.numel(), generator=gen) * 3 for t in vmap.to_union]
    peers = _TorchPeers(vmap, "cpu")
    want = union_probs(logits, vmap, backend="reference")
    for name in ("scatter_add", "index_add", "sparse_mm"):
        got = getattr(peers, name)(logits)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(got.argmax(dim=1), next_token(logits, vmap, backend="reference").union_ids), name
    probs, ids = peers.unite(logits, 4)
    want_probs, want_ids = union_topk(logits, vmap, 4, backend="reference")
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(probs, want_probs, rtol=1e-5, atol=1e-7)

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


def test_sample_peer_is_an_inverse_cdf():
    """The sampling peer draws from the row's distribution: a row with all mass on one id returns it, ids of
    zero probability are never drawn, and over many draws two ids of mass 1/4 and 3/4 split about 1:3
    (threshold: 4000 draws, the share of the heavier id within 0.70-0.80; a sampler that ignored the
    weights, the broken variant below, gives 0.5)."""
    torch.manual_seed(0)
    probs = torch.zeros(3, 10)
    probs[0, 7] = 1.0
    probs[1, [2, 5]] = torch.tensor([0.25, 0.75])
    probs[2, 9] = 1.0  # the last id: the clamp never moves a valid draw
    ids = torch.stack([_TorchPeers.sample(probs) for _ in range(4000)]).squeeze(-1)
    assert (ids[:, 0] == 7).all() and (ids[:, 2] == 9).all()
    assert set(ids[:, 1].tolist()) <= {2, 5}
    assert 0.70 <= (ids[:, 1] == 5).float().mean() <= 0.80
    uniform = (probs > 0).float()  # broken variant: every id with mass equally likely
    share = (torch.stack([_TorchPeers.sample(uniform[1:2]) for _ in range(4000)]) == 5).float().mean()
    assert not 0.70 <= share <= 0.80

"""Statistical laws of ``rejection_sample`` (Leviathan/Chen): emitted tokens follow the target, position by
position and jointly, and the acceptance rate is sum(min(p, q)).

Threshold: a chi-square statistic fails when it exceeds the chi-square quantile of upper tail ALPHA = 1e-6
(bins with expected count < 5 merged into one); a binomial count fails when it is more than Z = 5 standard
deviations from its mean. Every law is also run on deliberately broken samplers, test-only variants of
``pyfuse.reference.spec.rejection_core`` that differ in exactly one way (the accept uniform reused for the
residual draw, the target row of the next position, the raw instead of the processed draft distribution),
and each must fail the same statistic. The big correct runs use the CPU backend with seeds; the broken
variants and their control use the reference core with torch uniforms.
"""
from __future__ import annotations

import pytest
import torch

from pyfuse.reference import spec as ref
from pyfuse.spec import rejection_sample
from helpers import binomial_ok

stats = pytest.importorskip("scipy.stats")

ALPHA = 1e-6
Z = 5.0
N = 100_000
K = 3


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square of counts against probs (bins with expected < 5 merged) below the ALPHA quantile.
    A count in a bin of probability 0 fails at once."""
    counts, probs = counts.double(), probs.double()
    n = counts.sum()
    if bool((counts[probs == 0] > 0).any()):
        return False
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    if obs.numel() < 2:
        return bool(torch.isclose(obs.sum(), n))
    stat = float(((obs - exp) ** 2 / exp).sum())
    return stat <= stats.chi2.isf(ALPHA, obs.numel() - 1)



# ---- the samplers under test -----------------------------------------------------------------------------

def correct_cpu(ids, p, q_proc, q_raw, seed):
    return rejection_sample(ids, p, q_proc, seed=seed, validate=False, backend="cpu")


def _uniforms(ids, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((2, ids.shape[0], ids.shape[1] + 1), generator=g)


def _core(ids, p, q, u_accept, u_sample):
    n = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64)
    return ref.rejection_core(ids, n, p, q, u_accept, u_sample)


def reference_control(ids, p, q_proc, q_raw, seed):
    u = _uniforms(ids, seed)
    return _core(ids, p, q_proc, u[0], u[1])


def broken_reused_uniform(ids, p, q_proc, q_raw, seed):
    u = _uniforms(ids, seed)
    return _core(ids, p, q_proc, u[0], u[0])


def broken_next_row(ids, p, q_proc, q_raw, seed):
    u = _uniforms(ids, seed)
    shifted = torch.cat([p[:, 1:], p[:, -1:]], dim=1)
    return _core(ids, shifted, q_proc, u[0], u[1])


def broken_raw_q(ids, p, q_proc, q_raw, seed):
    u = _uniforms(ids, seed)
    return _core(ids, p, q_raw, u[0], u[1])


BROKEN = [broken_reused_uniform, broken_next_row, broken_raw_q]


# ---- per-position marginals ------------------------------------------------------------------------------

def _top(q, k):
    """The draft's processed distribution: top-k of the raw one, renormalised."""
    keep = q >= q.topk(k, dim=-1).values[..., -1:]
    q = torch.where(keep, q, 0.0)
    return q / q.sum(-1, keepdim=True)


def _case(name, vocab=12, seed=0):
    """(p [K+1, V], q_raw [K, V], q_processed [K, V]); the rows differ from position to position."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda rows, scale: torch.softmax(torch.randn(rows, vocab, generator=g) * scale, -1)  # noqa: E731
    if name == "equal":
        p = rand(K + 1, 1.0)
        return p, p[:K], p[:K]
    if name == "disjoint":
        half = vocab // 2
        p = torch.cat([rand(K + 1, 1.0)[:, :half], torch.zeros(K + 1, vocab - half)], 1)
        q = torch.cat([torch.zeros(K, half), rand(K, 1.0)[:, half:]], 1)
        return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    if name == "peaked":
        p, q = rand(K + 1, 4.0), rand(K, 4.0)
        return p, q, _top(q, 3)
    if name == "sparse":
        p = torch.where(torch.rand(K + 1, vocab, generator=g) < 0.3, rand(K + 1, 1.0), 0.0)
        p[:, 0] += 0.05
        q = torch.where(torch.rand(K, vocab, generator=g) < 0.3, rand(K, 1.0), 0.0)
        q[:, 1] += 0.05
        return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    if name == "smooth":
        p, q = rand(K + 1, 0.5), rand(K, 0.5)
        return p, q, q
    raise KeyError(name)


def _draw_drafts(q, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(q.shape[0])], 1)


def marginals_ok(res, p) -> bool:
    """Token at position i among rows that reached i ~ p[i]; acceptance at i ~ sum(min(p_i, q_i))."""
    tokens, num = res[0], res[1].long()
    tested = 0
    for i in range(p.shape[0]):
        reached = num >= i
        if int(reached.sum()) < 1000:
            continue
        tested += 1
        if not chi2_ok(torch.bincount(tokens[reached, i].long(), minlength=p.shape[1]), p[i]):
            return False
    assert tested >= 1
    return True


def acceptance_ok(res, p, q) -> bool:
    num = res[1].long()
    alpha = torch.minimum(p[:K], q).sum(-1).clamp(max=1.0)
    for i in range(K):
        reached = int((num >= i).sum())
        if reached < 1000:
            continue
        if not binomial_ok(int((num >= i + 1).sum()), reached, float(alpha[i]), Z):
            return False
    return True


def _run(sampler, name, vocab=12, n=N, seed=0):
    p, q_raw, q_proc = _case(name, vocab, seed)
    ids = _draw_drafts(q_proc, n, seed + 1)
    res = sampler(ids, p[None].expand(n, K + 1, vocab), q_proc[None].expand(n, K, vocab),
                  q_raw[None].expand(n, K, vocab), seed + 2)
    return res, p, q_proc


@pytest.mark.parametrize("name,vocab", [("equal", 12), ("disjoint", 12), ("peaked", 12), ("sparse", 12),
                                        ("smooth", 1500)])
def test_marginals_and_acceptance(name, vocab):
    """V = 1500 is not a multiple of any tile size."""
    res, p, q = _run(correct_cpu, name, vocab)
    assert marginals_ok(res, p)
    assert acceptance_ok(res, p, q)


def test_marginals_one_hot_draft():
    """draft_probs=None: a fixed draft token per position; acceptance is p(x)."""
    p, _, _ = _case("peaked")
    x = torch.tensor([3, 7, 7])
    ids = x.expand(N, K)
    res = rejection_sample(ids, p[None].expand(N, K + 1, 12), None, seed=5, validate=False, backend="cpu")
    assert marginals_ok(res, p)
    assert acceptance_ok(res, p, torch.nn.functional.one_hot(x, 12).float())


def test_marginal_broken_variants_fail():
    for sampler in [reference_control] + BROKEN:
        res, p, q = _run(sampler, "peaked")
        ok = marginals_ok(res, p) and acceptance_ok(res, p, q)
        assert ok == (sampler is reference_control), sampler.__name__


# ---- joint law under a Markov target (note section 9) ----------------------------------------------------

MV, MN, NGRAM = 6, 60_000, 4


def _markov(seed=0):
    """Target P and raw draft Q transition matrices with zeros; the draft samples from top-2 of Q."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(MV, MV, generator=g) ** 2 * (torch.rand(MV, MV, generator=g) < 0.8)
    p[:, 0] += 0.02
    q = torch.rand(MV, MV, generator=g) + 0.05
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True), _top(q / q.sum(-1, keepdim=True), 2)


def _generate(sampler, seed):
    """Speculative generation of NGRAM tokens per sequence from context token 0, K drafts per round."""
    P, Q, Qp = _markov()
    g = torch.Generator().manual_seed(seed)
    seq = torch.zeros(MN, NGRAM * (K + 1), dtype=torch.long)
    length = torch.zeros(MN, dtype=torch.long)
    ctx = torch.zeros(MN, dtype=torch.long)
    rows = torch.arange(MN)
    cdf = Qp.cumsum(-1)
    for rnd in range(NGRAM):
        xs = [ctx]
        for _ in range(K):  # inverse-CDF draws from the processed draft rows
            u = torch.rand(MN, 1, generator=g)
            xs.append((cdf[xs[-1]] < u).sum(-1).clamp(max=MV - 1))
        hist = torch.stack(xs, 1)  # context, x1..xK
        ids = hist[:, 1:]
        res = sampler(ids, P[hist], Qp[hist[:, :K]], Q[hist[:, :K]], seed * 100 + rnd)
        tokens, num = res[0].long(), res[1].long()
        for j in range(K + 1):
            emit = j <= num
            seq[rows[emit], length[emit]] = tokens[emit, j]
            length += emit.long()
        ctx = seq[rows, length - 1]
    assert bool((length >= NGRAM).all())
    return seq[:, :NGRAM], P


def joint_ok(seq, P) -> bool:
    code = torch.zeros(MN, dtype=torch.long)
    for j in range(NGRAM):
        code = code * MV + seq[:, j]
    probs = torch.ones(MV**NGRAM, dtype=torch.float64)
    prev = torch.zeros(MV**NGRAM, dtype=torch.long)
    grid = torch.arange(MV**NGRAM)
    for j in range(NGRAM):
        tok = (grid // MV ** (NGRAM - 1 - j)) % MV
        probs *= P.double()[prev, tok]
        prev = tok
    return chi2_ok(torch.bincount(code, minlength=MV**NGRAM), probs)


def test_joint_law_markov():
    seq, P = _generate(correct_cpu, seed=1)
    assert joint_ok(seq, P)


@pytest.mark.parametrize("sampler", BROKEN)
def test_joint_law_broken_variants_fail(sampler):
    seq, P = _generate(sampler, seed=2)
    assert not joint_ok(seq, P)

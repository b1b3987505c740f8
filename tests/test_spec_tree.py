"""pyfuse.spec.verify_tree: every backend vs the reference bit for bit, greedy vs an independent walk, the
exact output law of the lossless modes by enumeration, a Monte Carlo chi-square with a broken variant, bad
input, opcheck and torch.compile."""
import itertools
import math

import numpy as np
import pytest
import torch

from helpers import BACKEND_DEVICES, KERNEL_BACKEND_DEVICES

from pyfuse.spec import verify_tree

# Trees in the first-child / next-sibling layout (N = 5 nodes, node 0 = root).
TREES = {
    "chain": ([1, 2, 3, 4, -1], [-1, -1, -1, -1, -1]),  # 0 -> 1 -> 2 -> 3 -> 4
    "star": ([1, -1, -1, -1, -1], [-1, 2, 3, 4, -1]),  # 0 -> {1, 2, 3, 4}
    "balanced": ([1, 3, -1, -1, -1], [-1, 2, -1, 4, -1]),  # 0 -> {1 -> {3, 4}, 2}
}
MODES = ("greedy", "target_only", "stochastic")


def _tree_batch(name, batch, device="cpu"):
    first, sib = TREES[name]
    return (torch.tensor([first] * batch, device=device), torch.tensor([sib] * batch, device=device))


def _children(first, sib, node):
    out, c = [], first[node]
    while c != -1:
        out.append(c)
        c = sib[c]
    return out


def _depth(first, sib, node=0):
    return 1 + max((_depth(first, sib, c) for c in _children(first, sib, node)), default=0)


def _random_case(gen, batch, n, vocab, dtype, device, tree="balanced"):
    """Random candidates on a fixed tree plus normalised target and draft rows."""
    first, sib = TREES[tree] if n == 5 else _random_tree(gen, n)
    nt = torch.tensor([first] * batch)
    ns = torch.tensor([sib] * batch)
    cand = torch.randint(0, vocab, (batch, n), generator=gen)
    target = torch.softmax(2 * torch.randn(batch, n, vocab, generator=gen), -1).to(dtype)
    draft = torch.softmax(torch.randn(batch, n, vocab, generator=gen), -1).to(dtype)
    return [t.to(device) for t in (cand, nt, ns, target, draft)]


def _random_tree(gen, n):
    """Parent of node i is a random earlier node; converted to first-child / next-sibling arrays."""
    first, sib, last = [-1] * n, [-1] * n, [-1] * n
    for i in range(1, n):
        parent = int(torch.randint(0, i, (), generator=gen))
        if first[parent] == -1:
            first[parent] = i
        else:
            sib[last[parent]] = i
        last[parent] = i
    return first, sib


def _run(case, mode, backend, device, **kw):
    cand, nt, ns, target, draft = case
    return verify_tree(cand, nt, ns, target, mode=mode, draft_probs=draft if mode == "stochastic" else None,
                       backend=backend, **kw)


def _assert_equal(out, ref):
    for a, b, name in zip(out, ref, ("accept_index", "accept_len", "token_ids", "bonus")):
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs:\n{a}\n{b}"


# ---- every backend equals the reference bit for bit -------------------------------------------------------

@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backend_matches_reference(backend, device, mode, dtype):
    gen = torch.Generator().manual_seed(11)
    for n, vocab, batch in ((9, 13, 3), (1, 5, 2)):  # random tree with odd sizes; root only
        case = _random_case(gen, batch, n, vocab, dtype, device)
        seeds = torch.randint(0, 2**62, (batch,), generator=gen).to(device)
        u = torch.rand(2, batch, n, generator=gen).to(device)
        u[0, 0] = 0.0  # exact-zero coins must not accept zero-probability tokens
        kws = [{"seed": seeds, "max_depth": 1}, {"uniforms": u}, {"seed": 1234}]
        for kw in kws if dtype == torch.float32 else kws[:1]:  # half types only change the row loads
            ref = _run(case, mode, "reference", device, **kw)
            _assert_equal(_run(case, mode, backend, device, **kw), ref)
            assert ((ref.token_ids >= 0) | (ref.token_ids == -1)).all() and (ref.token_ids < vocab).all()


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_large_vocab_matches_reference(backend, device):
    """V spans several kernel blocks/lanes with a tail; drafts copy target samples so paths go deep."""
    gen = torch.Generator().manual_seed(21)
    cand, nt, ns, target, draft = _random_case(gen, 3, 7, 1337, torch.bfloat16, device)
    cand[:, 1:] = torch.multinomial(target[:, 0].float().cpu(), 6, replacement=True, generator=gen).to(device)
    for mode in MODES:
        ref = _run((cand, nt, ns, target, draft), mode, "reference", device, seed=9)
        _assert_equal(_run((cand, nt, ns, target, draft), mode, backend, device, seed=9), ref)


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_strided_and_degenerate_rows(backend, device):
    """Non-contiguous rows, rows with NaN / all-zero probabilities, out-of-vocabulary candidates and
    uniforms outside [0, 1) (validate=False): every emitted id stays in [0, V)."""
    gen = torch.Generator().manual_seed(5)
    cand, nt, ns, target, draft = _random_case(gen, 3, 5, 6, torch.float32, device)
    wide = torch.zeros(3, 5, 12, device=device)
    wide[..., ::2] = target
    target = wide[..., ::2]  # stride 2 along V
    target[0, 0] = float("nan")
    target[1] = 0.0
    draft[2, 0] = 0.0
    cand[1, 1] = 999  # a candidate outside the vocabulary
    bad_u = torch.full((2, 3, 5), float("nan"), device=device)
    bad_u[:, 1] = 1.0  # invalid injected uniforms must still give in-range ids
    bad_u[:, 2] = -0.5
    for mode in MODES:
        for kw in ({"seed": 3}, {"uniforms": bad_u}):
            ref = _run((cand, nt, ns, target, draft), mode, "reference", device, validate=False, **kw)
            out = _run((cand, nt, ns, target, draft), mode, backend, device, validate=False, **kw)
            _assert_equal(out, ref)
            assert ((out.bonus >= 0) & (out.bonus < 6)).all()
            emitted = out.token_ids[out.token_ids >= 0]
            assert (emitted < 6).all(), out.token_ids


def test_zero_coin_rejects_zero_probability_token():
    """u = 0 must not accept a draft token of target probability 0 (SGLang #35771)."""
    cand = torch.tensor([[0, 2]])
    nt, ns = torch.tensor([[1, -1]]), torch.tensor([[-1, -1]])
    target = torch.tensor([[[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]])
    draft = torch.tensor([[[0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]]])
    u = torch.zeros(2, 1, 2)
    for mode in ("target_only", "stochastic"):
        out = verify_tree(cand, nt, ns, target, mode=mode, draft_probs=draft if mode == "stochastic" else None,
                          uniforms=u, backend="cpu")
        assert out.accept_len.item() == 0 and out.bonus.item() == 0


# ---- greedy: exact against an independent walk ------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_greedy_matches_python_walk(backend, device):
    gen = torch.Generator().manual_seed(3)
    batch, n, vocab = 6, 8, 5
    firsts, sibs = zip(*[_random_tree(gen, n) for _ in range(batch)])
    logits = torch.randn(batch, n, vocab, generator=gen)
    cand = torch.randint(0, vocab, (batch, n), generator=gen)
    cand[:, 1:] = torch.where(torch.rand(batch, n - 1, generator=gen) < 0.6,
                              torch.gather(logits.argmax(-1), 1, torch.tensor(_parents(firsts, sibs))[:, 1:]),
                              cand[:, 1:])  # make acceptance likely
    out = verify_tree(cand.to(device), torch.tensor(firsts).to(device), torch.tensor(sibs).to(device),
                      logits.to(device), mode="greedy", backend=backend)
    for b in range(batch):
        node, path = 0, [0]
        while True:
            best = int(logits[b, node].argmax())
            nxt = [c for c in _children(firsts[b], sibs[b], node) if int(cand[b, c]) == best]
            if not nxt:
                break
            node = nxt[0]
            path.append(node)
        tokens = [int(cand[b, c]) for c in path[1:]] + [int(logits[b, node].argmax())]
        assert out.accept_len[b].item() == len(path) - 1
        assert out.accept_index[b, : len(path)].tolist() == path
        assert out.token_ids[b, : len(tokens)].tolist() == tokens
        assert (out.token_ids[b, len(tokens):] == -1).all() and (out.accept_index[b, len(path):] == -1).all()


def _parents(firsts, sibs):
    out = []
    for first, sib in zip(firsts, sibs):
        parent = [0] * len(first)
        for node in range(len(first)):
            for c in _children(first, sib, node):
                parent[c] = node
        out.append(parent)
    return out


# ---- exact output law by enumeration ---------------------------------------------------------------------

def _markov(seed, vocab):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(vocab, 0.7), size=vocab)  # context-dependent target: row = last token
    q = rng.dirichlet(np.full(vocab, 0.7), size=vocab)
    return p, q


def _step_law(mode, first, sib, tok, p_rows, q_rows, node=0, broken=False):
    """Exact law {emitted tuple: prob} of one verification from `node`, drafted tokens `tok` fixed."""
    p = p_rows[tok[node]].copy()
    q = q_rows[tok[node]]
    law = {}
    kids = _children(first, sib, node)
    reach = 1.0
    tried = set()
    for c in kids:
        x = tok[c]
        if mode == "target_only":
            a = 0.0 if x in tried else p[x]  # share of the single coin
            tried.add(x)
        else:
            a = 1.0 if q[x] == 0 else min(1.0, p[x] / q[x])
        if a > 0:
            for seq, pr in _step_law(mode, first, sib, tok, p_rows, q_rows, c, broken).items():
                law[(x,) + seq] = law.get((x,) + seq, 0.0) + reach * a * pr
        if mode == "target_only":
            continue
        reach *= 1 - a
        if not broken:  # broken: keep testing later siblings against the original target row
            r = np.maximum(p - q, 0)
            p = r / r.sum() if r.sum() > 0 else p
    if mode == "target_only":
        final = p.copy()
        if not broken:  # broken: final draw may return a tried sibling
            final[list(tried)] = 0
        reach = 1.0 - sum(p[x] for x in tried)
        final = final / final.sum() if final.sum() > 0 else final
    else:
        final = p
    for y in range(len(final)):
        if reach * final[y] > 0:
            law[(y,)] = law.get((y,), 0.0) + reach * final[y]
    return law


def _drafted_law(mode, tree, p_rows, q_rows, broken=False):
    """Average the step law over drafts: every non-root token drawn i.i.d. from q at its parent."""
    first, sib = TREES[tree]
    n, vocab = len(first), len(p_rows)
    parent = _parents([first], [sib])[0]
    law = {}
    for assignment in itertools.product(range(vocab), repeat=n - 1):
        tok = (0,) + assignment
        weight = math.prod(q_rows[tok[parent[i]]][tok[i]] for i in range(1, n))
        for seq, pr in _step_law(mode, first, sib, tok, p_rows, q_rows, broken=broken).items():
            law[seq] = law.get(seq, 0.0) + weight * pr
    return law


def _ngram_law(step_law, p_rows, length):
    """Law of the first `length` tokens: the step's output continued autoregressively from the target."""
    out = {}
    for seq, pr in step_law.items():
        frontier = {seq[:length]: pr}
        while frontier and len(next(iter(frontier))) < length:
            frontier = {s + (y,): v * p_rows[s[-1]][y] for s, v in frontier.items() for y in range(len(p_rows))}
        for s, v in frontier.items():
            out[s] = out.get(s, 0.0) + v
    return out


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("mode", ["target_only", "stochastic"])
def test_enumerated_law_equals_target_joint_law(mode, tree):
    """Exact: the law of the first depth+1 tokens equals the target's joint law within 1e-12; the broken
    variant (no residual update / tried siblings not removed) misses it by more than 1e-3."""
    p_rows, q_rows = _markov(1, 4)
    first, sib = TREES[tree]
    length = _depth(first, sib)
    target = {s: math.prod(p_rows[a][b] for a, b in zip((0,) + s, s)) for s in
              itertools.product(range(4), repeat=length)}
    for broken, check in ((False, lambda err: err < 1e-12), (True, lambda err: err > 1e-3)):
        law = _ngram_law(_drafted_law(mode, tree, p_rows, q_rows, broken), p_rows, length)
        err = max(abs(law.get(s, 0.0) - v) for s, v in target.items())
        assert check(err), f"broken={broken}: max |law - target| = {err}"


# ---- Monte Carlo: the kernels sample the enumerated law ---------------------------------------------------

def _chi2_vs_law(counts, law, samples):
    """Chi-square of observed emitted sequences against an exact law; bins with expected < 5 merged."""
    expected = {s: v * samples for s, v in law.items()}
    small = [s for s, e in expected.items() if e < 5]
    stat, bins = 0.0, 0
    for s, e in expected.items():
        if e >= 5:
            stat += (counts.get(s, 0) - e) ** 2 / e
            bins += 1
    rest_e = sum(expected[s] for s in small)
    rest_o = sum(v for s, v in counts.items() if s not in expected or expected[s] < 5)
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
        bins += 1
    elif rest_o:
        stat = math.inf
    return stat, bins - 1


@pytest.mark.parametrize("mode", ["target_only", "stochastic"])
def test_monte_carlo_matches_enumerated_law(mode):
    """20k drafted trees through the cpu kernel: chi2 < df + 10 sqrt(2 df) against the enumerated law. The
    broken variant claims uniform draft rows (the kernel is told the wrong q, HF #47932) and must fail."""
    tree, vocab, samples = "balanced", 4, 20000
    p_rows, q_rows = _markov(2, vocab)
    first, sib = TREES[tree]
    parent = _parents([first], [sib])[0]
    gen = torch.Generator().manual_seed(0)
    tok = torch.zeros(samples, 5, dtype=torch.int64)
    qt, pt = torch.tensor(q_rows, dtype=torch.float32), torch.tensor(p_rows, dtype=torch.float32)
    for i in range(1, 5):
        tok[:, i] = torch.multinomial(qt[tok[:, parent[i]]], 1, generator=gen)[:, 0]
    nt, ns = _tree_batch(tree, samples)
    law = _drafted_law(mode, tree, p_rows, q_rows)
    seeds = torch.arange(samples, dtype=torch.int64) * 7919 + 1
    for broken in (False, True):
        q_claimed = torch.full_like(qt, 1 / vocab) if broken else qt
        out = verify_tree(tok, nt, ns, pt[tok], mode=mode, seed=seeds, backend="cpu",
                          draft_probs=q_claimed[tok] if mode == "stochastic" else None)
        lengths = (out.accept_len + 1).tolist()
        counts = {}
        for row, k in zip(out.token_ids.tolist(), lengths):
            counts[tuple(row[:k])] = counts.get(tuple(row[:k]), 0) + 1
        if broken and mode == "target_only":
            # target_only never reads q: the same law, so the control is the wrong-law comparison instead.
            law_wrong = _drafted_law(mode, tree, p_rows, q_rows, broken=True)
            stat, df = _chi2_vs_law(counts, law_wrong, samples)
        else:
            stat, df = _chi2_vs_law(counts, law, samples)
        threshold = df + 10 * math.sqrt(2 * df)
        assert (stat > threshold) if broken else (stat < threshold), f"broken={broken} chi2={stat:.1f} df={df}"


# ---- seeds -----------------------------------------------------------------------------------------------

def test_per_request_seeds_are_batch_invariant():
    gen = torch.Generator().manual_seed(8)
    case = _random_case(gen, 6, 5, 7, torch.float32, "cpu")
    seeds = torch.randint(0, 2**62, (6,), generator=gen)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    full = _run(case, "stochastic", "cpu", "cpu", seed=seeds)
    permuted = _run([t[perm] for t in case], "stochastic", "cpu", "cpu", seed=seeds[perm])
    _assert_equal(permuted, [t[perm] for t in full])
    others = [_run(case, "stochastic", "cpu", "cpu", seed=s).token_ids for s in range(4)]
    assert any(not torch.equal(others[0], o) for o in others[1:])


# ---- bad input -------------------------------------------------------------------------------------------

def _bad(**changes):
    gen = torch.Generator().manual_seed(0)
    cand, nt, ns, target, draft = _random_case(gen, 2, 5, 6, torch.float32, "cpu")
    args = dict(candidates=cand, retrive_next_token=nt, retrive_next_sibling=ns, target_probs=target,
                mode="stochastic", draft_probs=draft)
    for key, fn in changes.items():
        args[key] = fn(args[key]) if callable(fn) else fn
    return args


@pytest.mark.parametrize("changes,error,match", [
    ({"retrive_next_sibling": lambda t: t.index_fill(1, torch.tensor([2]), 1)}, ValueError, "reached by 2 links"),
    ({"retrive_next_token": lambda t: t.index_fill(1, torch.tensor([3]), 1)}, ValueError, "reached by 2 links"),
    ({"retrive_next_token": lambda t: t.index_fill(1, torch.tensor([4]), 5)}, ValueError, "< N = 5"),
    ({"retrive_next_token": lambda t: t.index_fill(1, torch.tensor([4]), -2)}, ValueError, "-1 or a node"),
    ({"retrive_next_token": lambda t: t.index_fill(1, torch.tensor([4]), 0)}, ValueError, "root node 0"),
    ({"retrive_next_sibling": lambda t: t.index_fill(1, torch.tensor([0]), 4)}, ValueError, "root has no sib"),
    ({"candidates": lambda t: t.index_fill(1, torch.tensor([2]), 6)}, ValueError, "candidates must be in"),
    ({"candidates": lambda t: t.float()}, TypeError, "candidates must have dtype"),
    ({"target_probs": lambda t: t[:, :4]}, ValueError, "target_probs must have shape"),
    ({"target_probs": lambda t: t * 2}, ValueError, "sum to 1"),
    ({"draft_probs": None}, ValueError, "needs draft_probs"),
    ({"draft_probs": lambda t: t.half()}, ValueError, "draft_probs must match"),
    ({"mode": "greedy"}, ValueError, "only used by mode 'stochastic'"),
    ({"mode": "typical"}, ValueError, "mode must be one of"),
    ({"max_depth": -1}, ValueError, "max_depth"),
    ({"uniforms": torch.rand(2, 2, 4)}, ValueError, "uniforms must have shape"),
    ({"uniforms": torch.ones(2, 2, 5)}, ValueError, "uniforms must be in"),
    ({"seed": torch.zeros(3, dtype=torch.int64)}, ValueError, "seed tensor must have shape"),
])
def test_bad_input_raises(changes, error, match):
    args = _bad(**changes)
    with pytest.raises(error, match=match):
        verify_tree(**args)


# ---- torch.library -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_opcheck(backend, device):
    gen = torch.Generator().manual_seed(1)
    cand, nt, ns, target, draft = _random_case(gen, 2, 5, 6, torch.float32, device)
    seeds = torch.tensor([5, 6], device=device)
    u = torch.rand(2, 2, 5, generator=gen).to(device)
    for mode, d, uu in ((1, None, None), (2, draft, u)):
        torch.library.opcheck(torch.ops.pyfuse.verify_tree.default,
                              (cand, nt, ns, target, d, mode, 3, seeds, False, uu, backend))


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(2)
    cand, nt, ns, target, draft = _random_case(gen, 3, 5, 6, torch.float32, "cpu")
    seeds = torch.tensor([1, 2, 3])

    def fn(cand, nt, ns, target, draft, seeds):
        out = verify_tree(cand, nt, ns, target, mode="stochastic", draft_probs=draft, seed=seeds, validate=False)
        return out.token_ids, out.accept_len + 1

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(cand, nt, ns, target, draft, seeds), fn(cand, nt, ns, target, draft, seeds)):
        assert torch.equal(a, b)

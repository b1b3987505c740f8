"""Union-vocabulary ops (union_probs, union_topk, next_token): the reference against an independent float64
oracle, every backend bit-identical to the reference, sampling statistics, bad input, opcheck, compile."""
import math

import pytest
import torch

from pyfuse.ensemble import SimpleVocabMap, next_token, synthetic_map, union_probs, union_topk
from pyfuse.ensemble.maps import SPARSE_SHARE, build_reverse_index, tables_for
from pyfuse.ensemble.ops import MAX_TOPK, _check_weights, _pattern_coefficients
from pyfuse.reference import ensemble as ref
from helpers import BACKEND_DEVICES, FLOAT_DTYPES, KERNEL_BACKEND_DEVICES, cpu_avx512_paths

MODES = [("prob", "zero"), ("prob", "renormalize"), ("logprob", "zero"), ("logprob", "renormalize")]


def small_map(vocab_sizes, union_size, seed=0):
    """Random map with ignored ids (-1), many-to-one ids and union ids some models lack."""
    gen = torch.Generator().manual_seed(seed)
    return SimpleVocabMap([torch.randint(-1, union_size, (v,), generator=gen, dtype=torch.int32)
                           for v in vocab_sizes], union_size)


def make_logits(vmap, batch, dtype, device, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, t.numel(), generator=gen) * scale).to(dtype).to(device) for t in vmap.to_union]


def oracle(logits, vmap, weights, temps, mode, absent):
    """float64 union distribution, written from the definition with dense [V_m, U] matrices."""
    U = vmap.union_size
    w = weights.double() / weights.double().sum(-1, keepdim=True)
    probs, present = [], []
    for x, fwd, t in zip(logits, vmap.to_union, temps):
        x = torch.where(fwd >= 0, x.double() / t, -math.inf)
        onehot = torch.zeros(fwd.numel(), U, dtype=torch.float64)
        rows = torch.nonzero(fwd >= 0).flatten()
        onehot[rows, fwd[rows].long()] = 1.0
        probs.append(torch.softmax(x, dim=1) @ onehot)
        present.append(onehot.sum(0) > 0)
    P, has = torch.stack(probs, -1), torch.stack(present, -1).double()
    a = w[:, None, :].expand(P.shape).clone()
    if absent == "renormalize":
        a = a * has
        a = a / a.sum(-1, keepdim=True).clamp(min=1e-300)
    if mode == "prob":
        s = (a * P).sum(-1)
    else:
        s = torch.where(a > 0, a * torch.log(P), 0.0).sum(-1).exp()
        s = torch.where((a > 0).any(-1), s, 0.0)
    return s / s.sum(-1, keepdim=True)


def test_exp_log_det_accuracy():
    # Every 97th float32 in [-87, 0] (11.5M values, all 32 table entries) and the worst case of an exhaustive
    # sweep (1.72 ulp at z = -0.76896): within 1.73 ulp of exp.
    z = -torch.arange(0, 0x42AE0001, 97, dtype=torch.int32).view(torch.float32)
    z = torch.cat([z, torch.tensor([-0.7689589858055115])])
    exact = z.double().exp()
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact.float())[1] - 24).double()
    err = ((ref.exp_det(z).double() - exact) / ulp).abs()
    assert err.max() < 1.73 and err[-1] > 1.7
    assert ref.EXP2_THIRTYSECONDS == tuple(float(torch.tensor(2.0 ** (j / 32), dtype=torch.float32))
                                           for j in range(32))
    assert torch.equal(ref.exp_det(torch.tensor([0.0, -88.0, -math.inf, math.nan])), torch.tensor([1.0, 0, 0, 0]))
    x = torch.linspace(1e-30, 8, 200001)
    assert (ref.log_det(x).double() - x.double().log()).abs().max() < 1e-6
    assert ref.log_det(torch.tensor([0.0, 1e-39])).eq(-math.inf).all()


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_exp_det_table_in_every_backend(backend, device):
    """Each backend writes exp_det's 32-entry table itself (the reference's tuple, a C++ array, a Triton select
    tree): z = y - max stepping by less than ln2/32 from 0 to -86 reaches every entry, several times, so the
    union probabilities (e * 1/S) equal the reference's only if every entry does. The CPU backend runs both its
    AVX-512 and its portable path."""
    vmap = SimpleVocabMap([torch.arange(4000, dtype=torch.int32)], 4000)
    x = -torch.linspace(0.0, 86.0, 4000).unsqueeze(0)
    assert torch.unique(torch.round(x * (32 / math.log(2))).long() % 32).numel() == 32
    want = union_probs([x], vmap, backend="reference")
    for avx512 in ([True, False] if backend == "cpu" else [True]):
        with cpu_avx512_paths(avx512):
            got = union_probs([x.to(device)], vmap, backend=backend).cpu()
        assert torch.equal(got, want), f"avx512={avx512}"


def test_build_reverse_index():
    off, ids = build_reverse_index(torch.tensor([2, -1, 0, 2, 2, 0], dtype=torch.int32), 4)
    assert off.tolist() == [0, 2, 2, 5, 5] and ids.tolist() == [2, 5, 0, 3, 4]


@pytest.mark.parametrize("mode,absent", MODES)
def test_reference_matches_float64_oracle(mode, absent):
    vmap = small_map((37, 64, 20), 50)
    logits = make_logits(vmap, 5, torch.float32, "cpu")
    weights = torch.rand(5, 3, generator=torch.Generator().manual_seed(1))
    temps = [0.7, 1.0, 2.5]
    got = union_probs(logits, vmap, weights, temperature=temps, mode=mode, absent=absent, backend="reference")
    expected = oracle(logits, vmap, weights, temps, mode, absent)
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-7)
    greedy = next_token(logits, vmap, weights, temperature=temps, mode=mode, absent=absent, backend="reference")
    top = expected.max(dim=1).values
    assert torch.all(expected.gather(1, greedy.union_ids[:, None])[:, 0] >= top * (1 - 1e-5))
    torch.testing.assert_close(greedy.prob.double(), top, rtol=2e-5, atol=1e-7)


def test_topk_reference_matches_unite_oracle():
    vmap = small_map((40, 60), 45, seed=3)
    logits = make_logits(vmap, 4, torch.float32, "cpu", seed=2)
    k = 4
    probs, ids = union_topk(logits, vmap, k, [0.3, 0.7], backend="reference")
    for b in range(4):
        cands = set()
        for x, fwd in zip(logits, vmap.to_union):
            valid = torch.nonzero(fwd >= 0).flatten()
            top = valid[torch.topk(x[b, valid], k).indices]
            cands |= set(fwd[top].tolist())
        cands = sorted(cands)
        full = [oracle([x[b:b + 1] for x in logits], vmap, torch.tensor([[1.0, 0.0]]), [1, 1], "prob", "zero"),
                oracle([x[b:b + 1] for x in logits], vmap, torch.tensor([[0.0, 1.0]]), [1, 1], "prob", "zero")]
        mix = sum(w * (p[0, cands] / p[0, cands].sum()) for w, p in zip((0.3, 0.7), full))
        order = sorted(range(len(cands)), key=lambda i: (-mix[i].item(), cands[i]))[:k]
        assert ids[b].tolist() == [cands[i] for i in order]
        torch.testing.assert_close(probs[b].double(), mix[order] / mix.sum(), rtol=2e-5, atol=1e-7)


def _all_ops(logits, vmap, weights, temps, mode, absent, backend, k):
    kw = dict(temperature=temps, mode=mode, absent=absent, backend=backend)
    return (union_probs(logits, vmap, weights, **kw), *next_token(logits, vmap, weights, **kw),
            *next_token(logits, vmap, weights, greedy=False, seed=2**40 + 3, stream=7, **kw),
            *union_topk(logits, vmap, k, weights, **kw))


def assert_bit_identical(logits, vmap, weights, temps, mode, absent, backend, k):
    device = logits[0].device
    got = _all_ops(logits, vmap, weights, temps, mode, absent, backend, k)
    expected = _all_ops([x.cpu() for x in logits], vmap, None if weights is None else weights.cpu(), temps, mode,
                        absent, "reference", k)
    names = ["union_probs", "greedy ids", "greedy model ids", "greedy prob", "sample ids", "sample model ids",
             "sample prob", "topk probs", "topk ids"]
    for name, g, e in zip(names, got, expected):
        assert g.device.type == torch.device(device).type
        assert torch.equal(g.cpu(), e), f"{name} differs from the reference"


# Triton runs in the interpreter here: one small case per mode, dtypes rotated.
CASES = [((37, 64), 50, 3, torch.float32), ((90,), 70, 2, torch.bfloat16),
         ((20, 33, 41, 12), 60, 4, torch.float16), ((64, 50, 1), 40, 1, torch.float32)]


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("case", range(4))
def test_backends_bit_identical_small(backend, device, case):
    vocab, U, B, dtype = CASES[case]
    mode, absent = MODES[case]
    vmap = small_map(vocab, U, seed=case)
    vmap.to_union[-1][0] = 5  # a one-token model (case 3) still has a valid id
    logits = make_logits(vmap, B, dtype, device, seed=case)
    weights = torch.rand(B, len(vocab), generator=torch.Generator().manual_seed(case)).to(device)
    if case == 3:
        weights = None  # equal weights
    temps = [0.5 + 0.25 * m for m in range(len(vocab))]
    assert_bit_identical(logits, vmap, weights, temps, mode, absent, backend, min(3, *vocab))


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKEND_DEVICES if p.values[0] != "triton"])
@pytest.mark.parametrize("mode,absent,dtype", [("prob", "zero", torch.float32),
                                               ("logprob", "renormalize", torch.bfloat16)])
def test_backends_bit_identical_wide(backend, device, mode, absent, dtype):
    """Real vocabulary sizes (Qwen2 151936 + Llama-3 128256), 70% overlap, many-to-one ids: many tile groups."""
    vmap = synthetic_map((151936, 128256), seed=1)
    weights = torch.tensor([0.4, 0.6], device=device)
    for batch in (1, 3):  # on 2 CPU cores: one row split over the threads, then whole rows per thread
        logits = make_logits(vmap, batch, dtype, device, seed=5)
        assert_bit_identical(logits, vmap, weights, [1.0, 0.8], mode, absent, backend, 8)


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize("dtype,ordered", [(torch.float32, True), (torch.float32, False), (torch.float16, True),
                                           (torch.bfloat16, False)])
def test_cpu_avx512_paths_bit_identical(dtype, ordered, avx512):
    """The CPU's intrinsic paths (exponential sums, gathers) and its portable ones both give the reference's
    bits: vocabularies that are not a multiple of 16 (tails), logits far below the max (exp_det's z < -87),
    -inf logits, and a tie at the max; union ids in the first model's order (as VocabMap numbers them: its
    gathers read runs of neighbouring ids) or shuffled (every model's gathers random)."""
    vmap = synthetic_map((1000, 777), overlap=0.6, many_to_one=0.05, padding=3, seed=3, ordered=ordered)
    logits = make_logits(vmap, 3, dtype, "cpu", seed=9)
    logits[0][:, 10:40] = -1e4
    logits[1][0, 5] = float("-inf")
    logits[1][1, 7] = logits[1][1, 9] = logits[1][1].max()
    weights = torch.tensor([0.3, 0.7])
    with cpu_avx512_paths(avx512) as used:
        if avx512 and not used:
            pytest.skip("this CPU has no AVX-512")
        for mode, absent in MODES:
            assert_bit_identical(logits, vmap, weights, [1.0, 0.7], mode, absent, "cpu", 4)


def special_first(vmap):
    """The same map with union id 0 renumbered last, as VocabMap numbers a model's specials after its text
    tokens: model 0's id 0 then breaks its first vector's run of consecutive union ids."""
    U = vmap.union_size
    new_id = torch.cat([torch.tensor([U - 1]), torch.arange(U - 1)])
    return SimpleVocabMap([torch.where(f >= 0, new_id[f.long().clamp(min=0)], -1).to(torch.int32)
                           for f in vmap.to_union], U)


def test_row_layout_tables():
    """Model 0's row layout (pyfuse/ensemble/maps.py: row_layout) against its definition, id by id."""
    vmap = special_first(synthetic_map((1000, 777), overlap=0.6, many_to_one=0.05, padding=3, seed=3))
    bits, start, mstart, single, slot = tables_for(vmap, "cpu").row_layout
    fwd = vmap.to_union[0].tolist()
    first, count = {}, {}
    for v, u in enumerate(fwd):
        if u >= 0:
            first.setdefault(u, v)
            count[u] = count.get(u, 0) + 1
    members = [v for v, u in enumerate(fwd) if u >= 0 and count[u] > 1]
    for k in range(bits.numel()):
        lanes = range(16 * k, min(16 * k + 16, len(fwd)))
        firsts = [v for v in lanes if fwd[v] >= 0 and first[fwd[v]] == v]
        mine = [v for v in lanes if v in set(members)]
        word = int(bits[k]) & 0xFFFFFFFF
        assert word & 0xFFFF == sum(1 << (v - 16 * k) for v in firsts)
        assert word >> 16 == sum(1 << (v - 16 * k) for v in mine)
        us = [fwd[v] for v in firsts]
        assert int(start[k]) == (us[0] if us and us == list(range(us[0], us[0] + len(us))) else -1)
        assert int(mstart[k]) == sum(v < 16 * k for v in members)
    for u in range(vmap.union_size):
        assert (int(single[u // 16]) >> (u % 16)) & 1 == (count.get(u, 0) == 1)
    assert [members.index(v) for v in tables_for(vmap, "cpu").multi[0][:, 1].tolist()] == slot.tolist()
    assert int(start[0]) == -1 and int((start >= 0).sum()) > 50  # one vector one by one, the rest runs
    # Union ids numbered at random: model 0's vectors are not runs, so no layout (the gather path).
    assert tables_for(synthetic_map((1000, 777), seed=3, ordered=False), "cpu").row_layout == []


@pytest.mark.parametrize("batch", [1, 3], ids=["split", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_row_layout_bit_identical(batch, dtype):
    """Mode "prob" / absent "zero" on a map with a row layout: the AVX-512 path writes model 0's exponentials
    straight into the key row (the output of union_probs, a scratch row for sampling). Its results equal the
    reference, the portable path and the same map without the layout: model 0 larger than a statistics chunk
    in both thread modes (so chunks write at offsets of the row and of the many-to-one members' buffer), its
    size no multiple of 16 (the scalar tail), a first vector that is not a run, 5% many-to-one ids, weights
    per row, three models and one. (tests/test_output_cache.py: into a reused output holding NaN.)"""
    vmap = special_first(synthetic_map((40003, 777, 300), overlap=0.6, many_to_one=0.05, padding=3, seed=5))
    if batch == 3:  # one model: model 0's in-place term is the whole key
        vmap = SimpleVocabMap(vmap.to_union[:1], int(vmap.to_union[0].max()) + 1)
    assert tables_for(vmap, "cpu").row_layout
    plain = SimpleVocabMap(list(vmap.to_union), vmap.union_size)
    tables_for(plain, "cpu").row_layout.clear()
    logits = make_logits(vmap, batch, dtype, "cpu", seed=2)
    weights = torch.rand(batch, len(vmap.to_union), generator=torch.Generator().manual_seed(1))
    temps = [0.8, 1.0, 1.3] if batch == 1 else 1.0  # model 0's loop with and without the 1 / T multiply
    want = union_probs(logits, vmap, weights, temperature=temps, backend="reference")
    want_sample = next_token(logits, vmap, weights, temperature=temps, greedy=False, seed=7, backend="reference")
    runs = []
    for avx512, m in ((True, vmap), (False, vmap), (True, plain)):
        with cpu_avx512_paths(avx512) as used:
            if avx512 and not used:
                pytest.skip("this CPU has no AVX-512")
            runs.append((union_probs(logits, m, weights, temperature=temps, backend="cpu"),
                         next_token(logits, m, weights, temperature=temps, greedy=False, seed=7, backend="cpu")))
    for got, sample in runs:
        assert torch.equal(got, want)
        assert torch.equal(sample.union_ids, want_sample.union_ids)
        assert torch.equal(sample.prob, want_sample.prob)


def test_sparse_pairs_tables():
    """The map's sparse pairs (pyfuse/ensemble/maps.py: sparse_pairs) against their definition: for a later
    model whose single ids cover at most 1 in SPARSE_SHARE union ids, every (union id, its only id), ascending;
    none for model 0 and for a model covering more."""
    vmap = synthetic_map((40003, 30011, 3001), many_to_one=0.05, padding=3, seed=4)
    t = tables_for(vmap, "cpu")
    assert t.sparse[0].shape == (0, 2) and t.sparse[1].shape == (0, 2)
    single = t.first_ids[2]
    want = [(u, int(single[u])) for u in range(vmap.union_size) if int(single[u]) >= 0]
    assert 0 < len(want) * SPARSE_SHARE <= vmap.union_size
    assert [tuple(p) for p in t.sparse[2].tolist()] == want


@pytest.mark.parametrize("batch", [1, 5], ids=["split", "rows"])
@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "portable"])
def test_cpu_sparse_model_bit_identical(batch, avx512):
    """Mode "prob" / absent "zero" with a later model that covers few union ids: the CPU key pass adds that
    model's terms pair by pair from the map's sparse pairs instead of gathering 16 lanes at a time. Same bits as
    the reference in both thread modes: model 2 sparse, model 1 not, 5% many-to-one ids (their sums go the
    usual way), weights per row, temperature != 1, the last tile partial."""
    vmap = synthetic_map((40003, 30011, 3001), many_to_one=0.05, padding=3, seed=4)
    assert tables_for(vmap, "cpu").sparse[2].shape[0] > 0
    logits = make_logits(vmap, batch, torch.float32, "cpu", seed=6)
    weights = torch.rand(batch, 3, generator=torch.Generator().manual_seed(2))
    temps = [1.0, 0.7, 1.2]
    with cpu_avx512_paths(avx512) as used:
        if avx512 and not used:
            pytest.skip("this CPU has no AVX-512")
        got = union_probs(logits, vmap, weights, temperature=temps, backend="cpu")
        sample = next_token(logits, vmap, weights, temperature=temps, greedy=False, seed=3, backend="cpu")
    assert torch.equal(got, union_probs(logits, vmap, weights, temperature=temps, backend="reference"))
    want = next_token(logits, vmap, weights, temperature=temps, greedy=False, seed=3, backend="reference")
    assert torch.equal(sample.union_ids, want.union_ids) and torch.equal(sample.prob, want.prob)


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize("dense", [True, False], ids=["all-mapped", "unmapped-ids"])
def test_cpu_max_pass_blocks(avx512, dense):
    """The CPU max pass (blocks of 256 ids, a block rescanned for the lowest id of its max; the map not read in
    a chunk where every id is mapped) gives the reference's bits: ties at the max in different blocks, in one
    block and across the 32768-id chunks, a max in a chunk's tail, rising maxima, a row of -inf, and (when not
    dense) the largest logits on unmapped ids."""
    vmap = synthetic_map((40000, 3000), overlap=0.5, many_to_one=0.03, padding=0, seed=4)
    if not dense:
        for m, ids in ((0, [7, 4000, 33000, 39990]), (1, [11, 2999])):
            vmap.to_union[m][ids] = -1
    logits = make_logits(vmap, 7, torch.float32, "cpu", seed=11)
    x = logits[0]
    top = x.max() + 1.0
    x[0, 300] = x[0, 5000] = top                   # tie in different blocks: id 300
    x[1, 601] = x[1, 600] = x[1, 100] = top        # tie in one block, and an earlier one
    x[2, 39999] = top                              # the second chunk's tail (7232 = 28 * 256 + 64)
    x[3] = float("-inf")
    x[4] = torch.linspace(-5.0, 5.0, 40000)        # every block beats the last
    x[5, 32768 + 1000] = x[5, 20] = top            # tie across chunks
    for row, col in ((0, 7), (1, 4000), (2, 33000), (6, 39990)):
        x[row, col] = top + 10.0                   # largest, but unmapped when not dense
    logits[1][6, 11] = logits[1][6].max() + 5.0
    with cpu_avx512_paths(avx512) as used:
        if avx512 and not used:
            pytest.skip("this CPU has no AVX-512")
        for mode, absent in MODES:
            assert_bit_identical(logits, vmap, torch.tensor([0.6, 0.4]), [1.0, 0.9], mode, absent, "cpu", 4)


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "portable"])
def test_cpu_greedy_candidates_recorded_or_screened(avx512):
    """Greedy next_token's candidates: recorded by the AVX-512 exponential pass (ids within a bound of the max)
    or screened from the row: the reference's ids and probabilities for 1 to 4 models, with logits so large that
    recording is skipped (|max| >= 16384), flat rows (every id near the max), a near-tie between models, peaked
    rows (most 16-id vectors wholly below z = -28, where the AVX-512 sum skips the exponentials, next to
    vectors that straddle it), and temperatures."""
    vocab = (700, 513, 389, 64)
    with cpu_avx512_paths(avx512) as used:
        if avx512 and not used:
            pytest.skip("this CPU has no AVX-512")
        for M in (1, 2, 3, 4):
            vmap = synthetic_map(vocab[:M], overlap=0.6, many_to_one=0.05, padding=2, seed=M)
            base = make_logits(vmap, 6, torch.float32, "cpu", seed=20 + M)
            logits = [x.clone() for x in base]
            logits[0][1] += 30000.0                   # |max| >= 16384: the row is screened
            for x in logits:
                x[2] = 0.5                            # flat: every valid id is near the max
                x[3] = x[3] / 8                       # many ids within the bound
                x[4] = x[4] * 12                      # peaked: z from 0 down to ~-200
                x[5, ::3] -= 60.0                     # every vector straddles z = -28
            weights = torch.rand(6, M, generator=torch.Generator().manual_seed(M))
            temps = [0.7 + 0.2 * m for m in range(M)]
            for w in (weights, None):
                got = next_token(logits, vmap, w, temperature=temps, backend="cpu")
                want = next_token(logits, vmap, w, temperature=temps, backend="reference")
                for g, e in zip(got, want):
                    assert torch.equal(g, e), (M, avx512)


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize("offset", [0.0, 30000.0], ids=["recorded", "screened"])
def test_cpu_greedy_many_to_one_sum_wins(avx512, offset):
    """A union id whose three model ids each sit below the top single id (e = 0.4 vs 1) wins by their sum
    (1.2): greedy next_token must consider it, whether the near-max ids are recorded by the AVX-512 pass or
    the row is screened (|max| >= 16384, or the portable path)."""
    fwd = torch.arange(40, dtype=torch.int32) + 1
    fwd[[5, 17, 33]] = 0                                     # union id 0: three ids of the model
    vmap = SimpleVocabMap([fwd], 41)
    x = torch.full((2, 40), -3.0) + offset
    x[:, 9] = offset                                         # the top single id: e = 1
    x[:, [5, 17, 33]] = offset + math.log(0.4)               # e = 0.4 each
    x[1, 33] = offset - 8.0                                  # row 1: the sum 0.8 + e^-8 loses
    with cpu_avx512_paths(avx512) as used:
        if avx512 and not used:
            pytest.skip("this CPU has no AVX-512")
        got = next_token([x], vmap, backend="cpu")
    want = next_token([x], vmap, backend="reference")
    assert want.union_ids.tolist() == [0, 10]
    for g, e in zip(got, want):
        assert torch.equal(g, e)


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "portable"])
def test_cpu_greedy_sum_of_small_terms(avx512):
    """Greedy next_token's probability is e_top / S with S the fixed-point sum of every exponential, including
    terms of a few units of 2^-40 (z = -25: 15 units each; 40000 of them move fp32(S) by ~4 ulps). The AVX-512
    pass skips only vectors wholly below z = -28 (terms of 0): the reference's bits. A cut-off at -24 fails."""
    vmap = synthetic_map((40000,), overlap=1.0, many_to_one=0.0, padding=0, seed=2)
    x = torch.full((4, 40000), -25.0)
    x[:, 123] = 0.0
    x[1, 16:20000] = -29.0     # whole vectors below -28, then vectors of -25
    x[2, ::2] = -27.9          # half the lanes just above the floor: terms of 1 unit
    x[3, 1::16] = -40.0        # one lane per vector below the floor
    with cpu_avx512_paths(avx512) as used:
        if avx512 and not used:
            pytest.skip("this CPU has no AVX-512")
        got = next_token([x], vmap, backend="cpu")
    want = next_token([x], vmap, backend="reference")
    for g, e in zip(got, want):
        assert torch.equal(g, e)
    assert not torch.equal(want.prob[0], torch.tensor(1.0))  # the small terms are visible in S


@pytest.mark.parametrize("avx512", [True, False])
def test_cpu_fixed_point_sum_at_its_lane_limit(avx512):
    """The AVX-512 exponential pass sums fix(e) as two int32 lanes per id (H / 2^20 from the bits of
    e * 2^40 + 1.5 * 2^43, and the floor of the exact remainder): a row-mode chunk of 32768 ids all at the max
    (e = 1: f = 2^40) takes each H lane to exactly 2^31, the unsigned limit. Uniform rows (S = 32768 * 2^40, p =
    2^-15), one row above its max by a little (terms just below 1), against the reference's bits."""
    vmap = synthetic_map((32768,), overlap=1.0, many_to_one=0.0, padding=0, seed=3)
    x = torch.zeros(4, 32768)
    x[1] = -1e-6
    x[1, 7] = 0.0
    x[2, ::3] = -0.5
    with cpu_avx512_paths(avx512) as used:
        if avx512 and not used:
            pytest.skip("this CPU has no AVX-512")
        got = (union_probs([x], vmap, backend="cpu"), *next_token([x], vmap, backend="cpu"))
    want = (union_probs([x], vmap, backend="reference"), *next_token([x], vmap, backend="reference"))
    for g, e in zip(got, want):
        assert torch.equal(g, e)
    assert want[0][0].eq(2.0 ** -15).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_greedy_winner_below_every_top(backend, device):
    """Four models, each with its own top token (e = 1) and a shared second token at e = 0.3 (within 1/M..1.36/M
    of the max: near the greedy bound): the shared token wins (0.3 / S > 0.25 / S), although no model ranks it
    first. Run on the CPU with its AVX-512 and portable candidate paths."""
    from pyfuse.ensemble import VocabMap

    filler = [b"f%d" % i for i in range(37)]
    vmap = VocabMap.from_token_bytes([[b"top%d" % m, b"shared"] + filler for m in range(4)])
    shared = int(vmap.to_union[0][1])
    logits = []
    for m in range(4):
        x = torch.full((1, 39), -30.0)
        x[0, 0], x[0, 1] = 0.0, math.log(0.3)
        logits.append(x.to(device))
    for avx512 in ((True, False) if backend == "cpu" else (True,)):
        with cpu_avx512_paths(avx512):
            got = next_token(logits, vmap, backend=backend)
        assert got.union_ids.tolist() == [shared], avx512
        assert got.model_ids.tolist() == [[1, 1, 1, 1]]


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKEND_DEVICES if p.values[0] != "triton"])
@pytest.mark.parametrize("mode,absent", MODES)
def test_backends_bit_identical_batch64(backend, device, mode, absent):
    vmap = synthetic_map((300, 257, 411), overlap=0.5, many_to_one=0.1, padding=8, seed=2)
    logits = make_logits(vmap, 64, torch.float32, device, seed=6)
    weights = torch.rand(64, 3, generator=torch.Generator().manual_seed(6)).to(device)
    assert_bit_identical(logits, vmap, weights, [1.0, 0.9, 1.3], mode, absent, backend, 5)


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_strided_and_single_row(backend, device):
    vmap = small_map((30, 45), 40, seed=9)
    wide = make_logits(SimpleVocabMap([torch.zeros(60, dtype=torch.int32)] * 2, 1), 3, torch.float32, device)
    logits = [wide[0][:, :30], wide[1][:1, 5:50]]
    logits[0] = logits[0][:1]
    assert_bit_identical(logits, vmap, None, [1.0, 1.0], "prob", "zero", backend, 2)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_semantics_ties_absent_many_to_one(backend, device):
    # model 0: ids 0,1 -> union 0 (many-to-one), id 2 -> 1, id 3 ignored; model 1: id 0 -> 1, id 1 -> 2.
    vmap = SimpleVocabMap([torch.tensor([0, 0, 1, -1], dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int32)],
                          3, from_union=[torch.tensor([1, 2, -1], dtype=torch.int32),
                                         torch.tensor([-1, 0, 1], dtype=torch.int32)])
    logits = [torch.tensor([[0.0, 0.0, 0.0, 50.0]], device=device), torch.tensor([[0.0, 0.0]], device=device)]
    p = union_probs(logits, vmap, backend=backend).cpu()
    torch.testing.assert_close(p, torch.tensor([[1 / 3, 1 / 6 + 1 / 4, 1 / 4]]))  # id 3 ignored, 0+1 add up
    renorm = union_probs(logits, vmap, absent="renormalize", backend=backend).cpu()
    # each union id averages the models that have it: (2/3, 5/12, 1/2), then renormalised
    torch.testing.assert_close(renorm, torch.tensor([[8 / 19, 5 / 19, 6 / 19]]))
    out = next_token(logits, vmap, backend=backend)
    assert out.union_ids.tolist() == [1] and out.model_ids.tolist() == [[2, 0]]
    torch.testing.assert_close(out.prob.cpu(), torch.tensor([5 / 12]))
    lone = next_token([logits[0] * 0, torch.tensor([[-90.0, 0.0]], device=device)], vmap, [0.2, 0.8],
                      backend=backend)
    assert lone.union_ids.tolist() == [2] and lone.model_ids.tolist() == [[-1, 1]]  # model 0 lacks union 2
    tie = [torch.tensor([[0.0, -100.0, 0.0, 0.0]], device=device), torch.tensor([[-100.0, -100.0]], device=device)]
    out = next_token(tie, vmap, [1.0, 0.0], backend=backend)
    assert out.union_ids.tolist() == [0]  # union 0 and 1 tie: lowest union id
    geo = next_token(logits, vmap, mode="logprob", backend=backend)  # only union 1 is in both models
    assert geo.union_ids.tolist() == [1] and torch.allclose(geo.prob.cpu(), torch.tensor([1.0]))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_greedy_many_to_one_sum_wins(backend, device):
    """Greedy "prob" skips union ids that cannot reach the best key: a many-to-one union id must stay a
    candidate when each of its ids alone is far below the top id (below the single-id screen, about e = 0.25
    here) but their sum is above it. Model 0: id 0 (union 0) at e = 1, ids 1-5 (union 1) at e = 0.22 each
    (sum 1.1), id 6 (union 2) at e = 0.6, then padding; row 1 drops one of union 1's ids (sum 0.88)."""
    V = 1000
    fwd = torch.full((V,), -1, dtype=torch.int32)
    fwd[:7] = torch.tensor([0, 1, 1, 1, 1, 1, 2], dtype=torch.int32)
    fwd[7:900] = torch.arange(3, 896, dtype=torch.int32)
    vmap = SimpleVocabMap([fwd, torch.arange(896, dtype=torch.int32)], 896)
    x0 = torch.full((2, V), -30.0)
    x0[:, :7] = torch.tensor([5.0] + [5 + math.log(0.22)] * 5 + [5 + math.log(0.6)])
    x0[1, 3] = -30.0
    logits = [x0.to(device), torch.zeros(2, 896, device=device)]
    out = next_token(logits, vmap, [0.9, 0.1], backend=backend)
    assert out.union_ids.tolist() == [1, 0]
    assert torch.equal(out.prob.cpu(), next_token([x.cpu() for x in logits], vmap, [0.9, 0.1],
                                                   backend="reference").prob)


def test_sampling_chi_square():
    """2000 rows draw independently (counter = row); frequencies vs union_probs. Pearson chi-square over the
    union ids with p > 0, bins of expected count < 5 merged, df = bins - 1, threshold the 1 - 1e-3 quantile
    (a draw of an id with p = 0 fails outright). A sampler that ignores model 1 must fail the same test."""
    from scipy.stats import chi2 as chi2_dist

    vmap = small_map((12, 9), 10, seed=4)
    base = make_logits(vmap, 1, torch.float32, "cpu", seed=4, scale=1.0)
    logits = [x.expand(2000, -1).contiguous() for x in base]
    p = union_probs(base, vmap)[0].double()
    expected = 2000 * p
    order = torch.argsort(expected[p > 0], descending=True)
    support = torch.nonzero(p > 0).flatten()[order]
    big = support[expected[support] >= 5]
    small = support[expected[support] < 5]
    df = len(big) + (1 if len(small) else 0) - 1
    threshold = chi2_dist.isf(1e-3, df)

    def chi2(ids):
        counts = torch.bincount(ids, minlength=10).double()
        if counts[p == 0].sum() > 0:
            return float("inf")
        stat = ((counts[big] - expected[big]) ** 2 / expected[big]).sum().item()
        if len(small):
            stat += ((counts[small].sum() - expected[small].sum()) ** 2 / expected[small].sum()).item()
        return stat

    good = next_token(logits, vmap, greedy=False, seed=11).union_ids
    broken = next_token(logits, vmap, [1.0, 0.0], greedy=False, seed=11).union_ids
    assert chi2(good) < threshold
    assert chi2(broken) >= threshold
    again = next_token(logits, vmap, greedy=False, seed=11, stream=1).union_ids
    assert not torch.equal(good, again)  # streams give fresh draws


def test_bad_input():
    vmap = small_map((10, 12), 15)
    good = make_logits(vmap, 2, torch.float32, "cpu")
    cases = [
        (ValueError, "columns", lambda: union_probs([good[0], good[1][:, :11]], vmap)),
        (ValueError, "batch size", lambda: union_probs([good[0], good[1][:1]], vmap)),
        (ValueError, "one tensor per model", lambda: union_probs(good[:1], vmap)),
        (TypeError, "list or tuple", lambda: union_probs(good[0], vmap)),
        (TypeError, "dtype", lambda: union_probs([good[0], good[1].half()], vmap)),
        (ValueError, "shape", lambda: union_probs(good, vmap, torch.ones(3))),
        (ValueError, "shape", lambda: union_probs(good, vmap, torch.ones(3, 2))),
        (ValueError, ">= 0", lambda: union_probs(good, vmap, [1.0, -0.5])),
        (ValueError, "finite", lambda: union_probs(good, vmap, torch.tensor([[1.0, math.nan], [1.0, 1.0]]))),
        (ValueError, "positive sum", lambda: union_probs(good, vmap, [0.0, 0.0])),
        (ValueError, "temperature", lambda: union_probs(good, vmap, temperature=0.0)),
        (ValueError, "temperature", lambda: union_probs(good, vmap, temperature=[1.0])),
        (ValueError, "mode", lambda: union_probs(good, vmap, mode="geo")),
        (ValueError, "absent", lambda: union_probs(good, vmap, absent="skip")),
        (ValueError, "k must be", lambda: union_topk(good, vmap, 0)),
        (ValueError, "k must be", lambda: union_topk(good, vmap, MAX_TOPK + 1)),
        (ValueError, "k must be", lambda: union_topk(good, SimpleVocabMap([vmap.to_union[0], torch.tensor(
            [1, -1, 2] + [-1] * 9, dtype=torch.int32)], 15), 3)),  # model 1 maps only 2 ids
        (ValueError, "seed", lambda: next_token(good, vmap, greedy=False)),
        (ValueError, "stream", lambda: next_token(good, vmap, stream=-1)),
        (ValueError, "union ids", lambda: union_probs(good, SimpleVocabMap([t + 20 for t in vmap.to_union], 15))),
        (TypeError, "to_union", lambda: union_probs(good, object())),
    ]
    for err, words, call in cases:
        with pytest.raises(err, match=words):
            call()


def test_weight_values_checked_before_the_device_move():
    """Weights given as numbers (or a CPU tensor) are checked on the CPU, before they move to the logits'
    device, where a check would cost a device sync: "meta" stands in for a GPU here."""
    for weights, words in (([1.0, -0.5], ">= 0"), ([1.0, math.nan], "finite"), (torch.zeros(2), "positive sum")):
        with pytest.raises(ValueError, match=words):
            _check_weights(weights, 3, 2, "meta")
    assert _check_weights([1.0, 3.0], 3, 2, "meta").device.type == "meta"


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_empty_batch(backend, device):
    vmap = small_map((10, 12), 15)
    logits = make_logits(vmap, 0, torch.float32, device)
    assert union_probs(logits, vmap, backend=backend).shape == (0, 15)
    assert next_token(logits, vmap, backend=backend).model_ids.shape == (0, 2)
    assert union_topk(logits, vmap, 2, backend=backend)[1].shape == (0, 2)


def test_opcheck():
    vmap = small_map((10, 12), 15)
    logits = make_logits(vmap, 3, torch.float32, "cpu")
    t = tables_for(vmap, "cpu")
    w = _check_weights(None, 3, 2, "cpu")
    common = (logits, t.to_union, t.rev_offsets, t.rev_ids, t.first_ids, t.multi, t.row_layout, t.sparse,
              list(t.max_mult), t.present, w, _pattern_coefficients(w, True), [1.0, 0.5], True, True)
    torch.library.opcheck(torch.ops.pyfuse.union_probs.default, (*common, "cpu"))
    torch.library.opcheck(torch.ops.pyfuse.union_topk.default, (*common, 2, "cpu"))
    torch.library.opcheck(torch.ops.pyfuse.next_token.default, (*common, t.from_union, False, 5, 1, "cpu"))


def test_torch_compile_fullgraph():
    vmap = small_map((10, 12), 15)
    logits = make_logits(vmap, 3, torch.float32, "cpu")
    tables_for(vmap, "cpu")  # the map's tables are built eagerly (host work) before compiling

    def f(x0, x1):
        return (union_probs([x0, x1], vmap, [1.0, 2.0]) * 2, next_token([x0, x1], vmap, greedy=False, seed=3),
                union_topk([x0, x1], vmap, 2, mode="logprob"))

    got = torch.compile(f, fullgraph=True)(*logits)
    expected = f(*logits)
    for g, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        assert torch.equal(g, e)


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKEND_DEVICES if p.values[0] != "triton"])
@pytest.mark.parametrize("mode,absent", MODES)
def test_identity_runs_bit_identical(backend, device, mode, absent):
    """Identity-mapped stretches (a union built from model 0's ids in order; models sharing a tokenizer) across
    several union tiles of the CPU kernel (2048 ids): full runs, a run broken by one swap, padded ids."""
    V = 5000
    same = torch.arange(V, dtype=torch.int32)
    swapped = same.clone()
    swapped[[3000, 3001]] = swapped[[3001, 3000]]
    padded = same.clone()
    padded[-50:] = -1
    vmap = SimpleVocabMap([same, swapped, padded], V)
    logits = make_logits(vmap, 3, torch.float32, device, seed=11)
    weights = torch.tensor([[0.5, 0.3, 0.2]] * 3, device=device)
    assert_bit_identical(logits, vmap, weights, [1.0, 0.7, 1.2], mode, absent, backend, 4)

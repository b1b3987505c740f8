"""pyfuse::merge_task_vectors / pyfuse.merge_tensors: every backend against the reference over the knob
space (pairwise), dtypes, K, odd and non-contiguous shapes, edge densities, ties, statistics of the random
masks, bad input, opcheck and torch.compile."""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import (BACKEND_DEVICES, FLOAT_DTYPES, KERNEL_BACKEND_DEVICES, assert_close, binomial_ok,
                     cpu_avx512_paths)
from pyfuse.merge import merge_tensors
from pyfuse.merge.op import CONSENSUS, NORMALIZE, RESCALE, SPARSIFY

KNOBS = {
    "sparsify": SPARSIFY,
    "rescale": RESCALE,
    "consensus": CONSENSUS,
    "consensus_on": ("weighted", "unweighted"),
    "normalize": NORMALIZE,
}


def pairwise(knobs: dict) -> list[dict]:
    """A small set of knob combinations covering every pair of values of every two knobs (greedy)."""
    names = list(knobs)
    todo = {(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in knobs[a] for vb in knobs[b]}
    chosen = []
    while todo:
        best = max(itertools.product(*knobs.values()),
                   key=lambda c: sum((a, c[names.index(a)], b, c[names.index(b)]) in todo
                                     for a, b in itertools.combinations(names, 2)))
        combo = dict(zip(names, best))
        todo -= {(a, combo[a], b, combo[b]) for a, b in itertools.combinations(names, 2)}
        chosen.append(combo)
    return chosen


COMBOS = pairwise(KNOBS)


def task_inputs(shape, k, dtype, device, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + scale * torch.randn(shape, generator=g) for _ in range(k)]
    return base.to(device, dtype), [m.to(device, dtype) for m in models]


def both(backend, base, models, weights=None, **kw):
    """(backend result, reference result) of one merge_tensors call."""
    kw.setdefault("seed", 1234)
    got = merge_tensors(base, models, weights, backend=backend, **kw)
    want = merge_tensors(base, models, weights, backend="reference", **kw)
    return got, want


def small_shape(backend):
    # The Triton interpreter is slow: keep its grids tiny, still with masked tails.
    return (5, 19) if backend == "triton" else (37, 61)


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c.values()))
def test_knobs_match_reference(backend, device, combo):
    dtype = FLOAT_DTYPES[COMBOS.index(combo) % 3]
    base, models = task_inputs(small_shape(backend), 3, dtype, device)
    got, want = both(backend, base, models, [0.9, -0.4, 0.6], density=[0.3, 0.6, 1.0], gamma=0.1, epsilon=0.1,
                     lam=0.8, **combo)
    assert_close(got, want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_linear_merges_exact(dtype):
    """Linear merges (no sparsification, election or agreement divisor) take a one-sweep path on the CPU for
    1 to 4 models (with a base or task vectors), and per-model sweeps for 5: both give the reference's bits,
    with negative weights, lam, the all-weight divisor, another output dtype and a tail (n = 1000 + 7)."""
    g = torch.Generator().manual_seed(21)
    base = torch.randn(1007, generator=g).to(dtype)
    models = [(base.float() + 0.1 * torch.randn(1007, generator=g)).to(dtype) for _ in range(5)]
    for k in range(1, 6):
        weights = [0.7, -0.4, 1.3, 0.2, 0.9][:k]
        for b in (base, None):
            for kw in (dict(), dict(normalize="all_weight", lam=0.7), dict(out_dtype=torch.float32)):
                got, want = both("cpu", b, models[:k], weights, **kw)
                assert torch.equal(got, want), (k, b is None, kw)


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8, 33])
def test_model_counts(backend, device, k):
    base, models = task_inputs((3, 11) if backend == "triton" else (13, 29), k, torch.float32, device, seed=k)
    knob_sets = [dict(sparsify="magnitude", consensus="sum", normalize="agree_weight"),
                 dict(sparsify="random", rescale="l1", consensus="count", consensus_on="unweighted",
                      normalize="agree_count")]
    if backend == "triton":  # the interpreter pays per model and op: one knob set per K there
        knob_sets = knob_sets[k % 2:][:1]
    for knobs in knob_sets:
        got, want = both(backend, base, models, [0.5 + i / k for i in range(k)], density=0.4, **knobs)
        assert_close(got, want)


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1), (2, 3, 5), (4097,)])
def test_shapes_dtypes(backend, device, dtype, shape):
    if backend == "triton" and math.prod(shape) > 1000:
        shape = (1031,)
    base, models = task_inputs(shape, 3, dtype, device)
    got, want = both(backend, base, models, sparsify="breadcrumbs", density=0.5, gamma=0.2, consensus="sum",
                     normalize="agree_weight")
    assert got.shape == shape and got.dtype == dtype
    assert_close(got, want)
    got, want = both(backend, None, models, sparsify="magnitude", density=0.3, out_dtype=torch.float32)
    assert got.dtype == torch.float32
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_non_contiguous(backend, device):
    base, models = task_inputs((23, 9), 3, torch.float32, device)
    base_t, models_t = base.t(), [m.t() for m in models]
    assert not base_t.is_contiguous()
    got, want = both(backend, base_t, models_t, sparsify="della", density=0.5, epsilon=0.2, rescale="l1",
                     consensus="sum")
    assert_close(got, want)
    expect = merge_tensors(base_t.contiguous(), [m.contiguous() for m in models_t], backend=backend,
                           sparsify="della", density=0.5, epsilon=0.2, rescale="l1", consensus="sum", seed=1234)
    assert torch.equal(got, expect)


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("sparsify", ["magnitude", "random", "breadcrumbs", "della"])
def test_density_edges_and_zero_deltas(backend, device, sparsify):
    base, models = task_inputs((6, 17), 3, torch.float32, device)
    for density in (0.0, 1.0):
        got, want = both(backend, base, models, sparsify=sparsify, density=density, rescale="l1", consensus="sum",
                         normalize="agree_weight")
        assert_close(got, want)
    none = merge_tensors(base, models, backend=backend)
    full = merge_tensors(base, models, sparsify=sparsify, density=1.0, backend=backend, seed=3)
    assert torch.equal(full, none)  # density 1 keeps everything
    empty = merge_tensors(base, models, sparsify=sparsify, density=0.0, backend=backend, seed=3)
    assert torch.equal(empty, base)  # density 0 keeps nothing
    zeros = [base.clone() for _ in models]  # all-zero deltas: the L1 guard keeps the scale finite
    got, want = both(backend, base, zeros, sparsify=sparsify, density=0.5, rescale="l1", consensus="sum",
                     normalize="agree_weight")
    assert torch.equal(got, base) and torch.equal(want, base)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_ties_go_to_lowest_index(backend, device):
    """Independent of the reference: with every |delta| equal, the top-k are the k lowest flat indices."""
    n = 103
    sign = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    delta = (0.25 * sign).to(device)
    out = merge_tensors(None, [delta], sparsify="magnitude", density=0.5, backend=backend)
    k = int(0.5 * n)
    assert torch.equal(out[:k], delta[:k]) and not out[k:].any()
    # breadcrumbs: drop the int(0.1 n) "largest" (lowest indices), keep the next int(0.5 n)
    out = merge_tensors(None, [delta], sparsify="breadcrumbs", density=0.5, gamma=0.1, backend=backend)
    top = int(0.1 * n)
    assert not out[:top].any() and torch.equal(out[top:top + k], delta[top:top + k]) and not out[top + k:].any()


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_heavy_ties_bf16(backend, device):
    # bf16 deltas on a coarse grid: thousands share each magnitude, the threshold splits a tie group.
    g = torch.Generator().manual_seed(5)
    n = 999 if backend == "triton" else 200_003
    base = torch.zeros(n, dtype=torch.bfloat16, device=device)
    models = [(torch.randint(-4, 5, (n,), generator=g).float() / 4).to(device, torch.bfloat16) for _ in range(3)]
    got, want = both(backend, base, models, sparsify="magnitude", density=0.37, consensus="sum",
                     normalize="agree_weight", k_min_one=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKEND_DEVICES if p.values[0] != "triton"])
def test_large_top_k_band_and_fallbacks(backend, device):
    """From 2^18 elements the CPU selects top-k thresholds from a sampled key band; its exact fallbacks
    (heavy ties, a sample that misses the threshold) must give the reference's top-k as well."""
    n = 300_001
    g = torch.Generator().manual_seed(8)
    base = torch.randint(-8, 9, (n,), generator=g).float() / 8  # exact in fp32: x - base recovers the offsets
    smooth = [base + 0.1 * torch.randn(n, generator=g) for _ in range(2)]
    ties = [base + torch.randint(-4, 5, (n,), generator=g).float() / 4 for _ in range(2)]  # 5 distinct |d|
    # The sample is runs of 64 consecutive elements every n // 1024 = 292: large |d| only outside them.
    skew = base + torch.where(torch.arange(n) % 292 < 64, 0.01, 1.0) * torch.randn(n, generator=g)
    for models in (smooth, ties, [skew, smooth[0]]):
        models = [m.to(device) for m in models]
        # breadcrumbs: two thresholds per model, the top-k (k = 0.35 n) and the dropped outliers (k = 0.05 n)
        got, want = both(backend, base.to(device), models, [1.0, 0.6], sparsify="breadcrumbs", density=0.3,
                         gamma=0.05, consensus="sum", normalize="agree_weight")
        assert_close(got, want)


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_avx512_band_paths(dtype, avx512):
    """The CPU threshold sweep collects band candidates with AVX-512 (compress-stores, vector float16 /
    bfloat16 conversions) or with portable flag scans: both must give the reference's top-k sets, for
    magnitude (one threshold per model) and breadcrumbs (two), with and without a base. Sorted deltas pack
    the candidates into a few chunks (their buffers must grow); deltas on a 2^-12 grid put a few dozen ties
    at each threshold inside the band (the tie bound comes from the candidates' offsets); n = 300001
    leaves a tail. Second set: 16-bit weights fine-tuned by 1 %, whose deltas take few values: one key holds
    over 1 % of the elements at the threshold, so the sweep counts it instead of storing it and the tie bound
    comes from its per-chunk counts and a scan of one chunk."""
    n = 300_001
    g = torch.Generator().manual_seed(9)
    base = torch.randint(-8, 9, (n,), generator=g).float() / 8  # exact in fp32: x - base recovers the grid
    models = [base + 0.1 * torch.randn(n, generator=g), base + (0.1 * torch.randn(n, generator=g)).sort().values,
              base + torch.round(torch.randn(n, generator=g) * 4096) / 4096]
    smooth = torch.randn(n, generator=g).to(dtype)
    tuned = [(smooth.float() + 0.01 * torch.randn(n, generator=g)).to(dtype) for _ in range(3)]
    sets = [(base.to(dtype), [m.to(dtype) for m in models]), (None, [m.to(dtype) for m in models]), (smooth, tuned)]
    with cpu_avx512_paths(avx512) as used:
        if avx512 and not used:
            pytest.skip("this CPU has no AVX-512 F/BW/VL/DQ")
        for b, ms in sets:
            for kw in (dict(sparsify="magnitude", density=0.2), dict(sparsify="breadcrumbs", density=0.3, gamma=0.05)):
                got, want = both("cpu", b, ms, [1.0, 0.6, 0.8], consensus="sum", normalize="agree_weight", **kw)
                assert torch.equal(got, want)


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_avx512_l1_random_path(dtype, avx512):
    """DARE with rescale "l1": the statistics pass draws the keep decisions, records them as bits (replayed by
    the fused pass) and sums |d| and |kept d| in double lanes, with AVX-512 (a compare mask per 16 elements)
    or portably. Both must give the reference's bits. Sizes: below one vector, a tail of 8 + 5 elements, and
    several segments whose last Philox run holds 5 elements (its bit word is partly written)."""
    g = torch.Generator().manual_seed(5)
    with cpu_avx512_paths(avx512) as used:
        if avx512 and not used:
            pytest.skip("this CPU has no AVX-512 F/BW/VL/DQ")
        for n in (7, 1021, 2 * 2048 + 517):
            base = torch.randn(n, generator=g).to(dtype)
            models = [(base.float() + 0.1 * torch.randn(n, generator=g)).to(dtype) for _ in range(3)]
            for density in (0.3, 0.9):
                got, want = both("cpu", base, models, [1.0, 0.6, 0.8], sparsify="random", density=density,
                                 rescale="l1", consensus="sum", normalize="agree_weight")
                assert torch.equal(got, want), (n, density)


@pytest.mark.parametrize("cols", [61, 2500])
def test_cpu_della_ranks_with_ties(cols):
    """DELLA's row ranks (ties to the lower index) on the CPU: radix digits of 8 bits for short rows and 11
    bits from 2048 columns; deltas on a coarse grid put hundreds of equal magnitudes in each row, so a
    different tie order changes the keep probabilities and with them the result."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(3, cols, generator=g)
    models = [base + torch.randint(-6, 7, (3, cols), generator=g).float() / 4 for _ in range(2)]
    for rescale in ("none", "l1"):
        got, want = both("cpu", base, models, sparsify="della", density=0.5, epsilon=0.4, rescale=rescale,
                         consensus="sum")
        assert torch.equal(got, want), rescale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_16bit_conversions_every_value(dtype):
    """The CPU kernels convert 16-bit floats with branch-free code (so that the loops vectorize): every
    finite and infinite 16-bit value, scaled by weights that round (0.3), overflow (1.7 near the top of
    float16) and land in the subnormals (1e-3), must come out as the reference's torch conversions give."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    every = every[~torch.isnan(every)]
    for w in (0.3, 1.7, 1e-3):
        got = merge_tensors(None, [every], [w], backend="cpu")
        want = merge_tensors(None, [every], [w], backend="reference")
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_della_epsilon_zero(backend, device):
    """mergekit 0.1.5 accepts epsilon = 0 (every rank keeps with probability density); so does pyfuse."""
    base, models = task_inputs(small_shape(backend), 2, torch.float32, device)
    got, want = both(backend, base, models, sparsify="della", density=0.4, epsilon=0.0, rescale="l1", consensus="sum")
    assert_close(got, want)


def test_ties_match_peft_semantics():
    """Independent oracle: PEFT's ties (unweighted election, agree-count divisor) on tie-free deltas."""
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    _, models = task_inputs((31, 17), 3, torch.float32, "cpu")
    weights = torch.tensor([0.7, 1.2, 0.4])
    want = merge_utils.ties(list(models), weights, 0.3, "total")
    got = merge_tensors(None, models, weights, sparsify="magnitude", density=0.3, consensus="sum",
                        consensus_on="unweighted", normalize="agree_count")
    assert_close(got, want)


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_same_mask_as_reference_and_seed_sensitivity(backend, device):
    _, models = task_inputs((9, 31), 2, torch.float32, device)
    a = merge_tensors(None, models, sparsify="random", density=0.5, seed=2**64 - 1, backend=backend)
    b = merge_tensors(None, models, sparsify="random", density=0.5, seed=-1, backend="reference")
    assert torch.equal(a, b)  # seeds are taken mod 2**64 everywhere
    c = merge_tensors(None, models, sparsify="random", density=0.5, seed=7, backend=backend)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_random_mask_is_packed_philox(backend, device):
    """DARE keeps element j of model i iff the packed Philox uniform (word j % 4 of counter (j // 4, stream i,
    purpose)) is below the density: checked against the numpy oracle, odd n so the last counter is partial."""
    import numpy as np

    from pyfuse.merge.op import PURPOSE
    from pyfuse.reference.philox import packed_rand_np

    n, density, seed = 1001, 0.3, 2**40 + 9
    ones = torch.ones(n, device=device)
    out = merge_tensors(None, [ones, 2 * ones], sparsify="random", density=density, seed=seed, backend=backend)
    got = out.cpu().numpy().astype(np.int64)  # kept by model 0 adds 1, by model 1 adds 2
    index = np.arange(n, dtype=np.uint64)
    for i in range(2):
        want = packed_rand_np(seed, index, i, PURPOSE["random"]) < np.float32(density)
        assert np.array_equal((got >> i) & 1 == 1, want), i


def kept_fraction_ok(kept: torch.Tensor, p: float) -> bool:
    """Binomial check of a keep mask: its count within 5 standard deviations of n p (false alarm < 1e-6)."""
    return binomial_ok(int(kept.sum().item()), kept.numel(), p)


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKEND_DEVICES if p.values[0] != "triton"])
def test_random_keep_rate(backend, device):
    n = 200_000
    ones = torch.ones(n, device=device)
    for p in (0.1, 0.5, 0.9):
        kept = merge_tensors(None, [ones, ones], sparsify="random", density=p, seed=11, normalize="all_weight",
                             backend=backend) != 0
        assert kept_fraction_ok(kept, 1 - (1 - p) ** 2)
        # Broken variant: claiming the wrong density must fail the same check.
        assert not kept_fraction_ok(kept, 1 - (1 - (p + 0.01)) ** 2)


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKEND_DEVICES if p.values[0] != "triton"])
def test_della_keep_rate_follows_rank(backend, device):
    rows, cols, rho, eps = 400, 500, 0.4, 0.3
    row = torch.arange(1, cols + 1, dtype=torch.float32)  # rank = column index
    delta = row.repeat(rows, 1).to(device)
    kept = merge_tensors(None, [delta], sparsify="della", density=rho, epsilon=eps, seed=5, backend=backend) != 0
    probs = (rho - eps) + 2 * eps * torch.arange(cols) / (cols - 1)
    low, high = kept[:, : cols // 2].cpu(), kept[:, cols // 2:].cpu()
    p_low, p_high = probs[: cols // 2].mean().item(), probs[cols // 2:].mean().item()
    assert kept_fraction_ok(low, p_low) and kept_fraction_ok(high, p_high)
    # Broken variant: a flat keep probability (no rank dependence) must fail the same check.
    assert not (kept_fraction_ok(low, rho) and kept_fraction_ok(high, rho))


def test_bad_input():
    base, models = task_inputs((4, 5), 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="models"):
        merge_tensors(base, [])
    with pytest.raises(TypeError, match="models"):
        merge_tensors(base, models[0])
    with pytest.raises(ValueError, match=r"models\[1\].*shape"):
        merge_tensors(base, [models[0], models[1][:3]])
    with pytest.raises(TypeError, match=r"models\[1\].*dtype"):
        merge_tensors(base, [models[0], models[1].double().half()])
    with pytest.raises(TypeError, match=r"models\[0\]"):
        merge_tensors(None, [torch.ones(3, dtype=torch.int32)])
    with pytest.raises(ValueError, match="density"):
        merge_tensors(base, models, sparsify="magnitude", density=1.5)
    with pytest.raises(ValueError, match="density"):
        merge_tensors(base, models, sparsify="magnitude", density=[0.5, -0.1])
    with pytest.raises(ValueError, match="weights"):
        merge_tensors(base, models, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="weights"):
        merge_tensors(base, models, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="sparsify"):
        merge_tensors(base, models, sparsify="topk")
    with pytest.raises(ValueError, match="normalize"):
        merge_tensors(base, models, normalize=True)
    with pytest.raises(ValueError, match="epsilon"):
        merge_tensors(base, models, sparsify="della", density=0.5, epsilon=0.6)
    with pytest.raises(ValueError, match="della"):
        merge_tensors(base.reshape(2, 2, 5), [m.reshape(2, 2, 5) for m in models], sparsify="della", density=0.5)
    with pytest.raises(TypeError, match="seed"):
        merge_tensors(base, models, sparsify="random", density=0.5, seed=1.5)
    with pytest.raises(TypeError, match="out_dtype"):
        merge_tensors(base, models, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="lam"):
        merge_tensors(base, models, lam=float("inf"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            merge_tensors(base, [models[0], models[1].cuda()])
    else:
        with pytest.raises(ValueError, match="device"):
            merge_tensors(base, [models[0], models[1].to("meta")])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_opcheck(backend, device):
    base, models = task_inputs((2, 3) if backend == "triton" else (6, 7), 3, torch.float32, device)
    args = (base, models, [1.0, 0.5, 0.2], [0.5] * 3, [0.1] * 3, [0.1] * 3, "random", "l1", "sum", True,
            "agree_weight", 1.0, 3, False, torch.bfloat16, backend)
    torch.library.opcheck(torch.ops.pyfuse.merge_task_vectors.default, args)
    args_none = (None, models, [1.0, 0.5, 0.2], [0.5] * 3, [0.1] * 3, [0.1] * 3, "magnitude", "none", "count",
                 False, "agree_count", 0.5, 0, True, torch.float32, backend)
    torch.library.opcheck(torch.ops.pyfuse.merge_task_vectors.default, args_none)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_torch_compile(backend, device):
    base, models = task_inputs((8, 9), 3, torch.float32, device)

    def ties(b, x0, x1, x2):
        return merge_tensors(b, [x0, x1, x2], [1.0, 0.5, 0.3], sparsify="magnitude", density=0.4, consensus="sum",
                             normalize="agree_weight", backend=backend) * 2

    compiled = torch.compile(ties, fullgraph=True)  # inductor: the op stays opaque, the * 2 is generated code
    assert torch.equal(compiled(base, *models), ties(base, *models))


def determinism_outputs():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 1000, generator=g)
    models = [base + torch.randn(64, 1000, generator=g) for _ in range(3)]
    return [merge_tensors(base, models, sparsify=s, density=0.3, rescale="l1", consensus="sum", seed=9, backend="cpu")
            for s in ("random", "della", "magnitude")]


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKEND_DEVICES if p.values[0] == "cpu"])
def test_cpu_result_independent_of_thread_count(backend, device, tmp_path):
    """This process uses every core; a child process with one OpenMP thread must give identical bits."""
    path = tmp_path / "one_thread.pt"
    script = ("import sys, torch\nsys.path.insert(0, sys.argv[2])\nfrom test_merge import determinism_outputs\n"
              "torch.save(determinism_outputs(), sys.argv[1])\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script, str(path), os.path.dirname(__file__)], env=env, check=True,
                   timeout=300)
    for a, b in zip(torch.load(path), determinism_outputs()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (9,), (4099,), (3, 2500)])
def test_cpu_dare_l1_bit_exact(dtype, shape):
    """rescale="l1" with random sparsification: the CPU statistics pass records the keep decisions as bits and
    the fused pass replays them; the result must equal the reference bit for bit (segment tails included)."""
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g)
    models = [(base + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]
    got, want = both("cpu", base.to(dtype), models, [1.0, 0.5, 0.2], sparsify="random", density=0.3,
                     rescale="l1", consensus="sum", seed=5)
    assert torch.equal(got, want)

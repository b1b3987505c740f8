"""magnitude_prune / random_prune: every backend against the reference, the reference against an
independent numpy oracle, PEFT parity, opcheck, torch.compile, RNG identity and statistics, bad input."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import pyfuse
from pyfuse.reference import philox as ref_philox
from pyfuse.reference import prune as ref
from helpers import BACKEND_DEVICES, FLOAT_DTYPES, KERNEL_BACKEND_DEVICES, binomial_ok, cpu_avx512_paths

DENSITIES = [0.0, 1.0, 1e-6, 0.2]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that -0/+0 and NaN payloads count as differences."""
    return t.contiguous().view(INT_VIEW[t.dtype]).cpu()


def assert_same_bits(actual, expected):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    diff = bits(actual) != bits(expected)
    assert not diff.any(), f"{int(diff.sum())} of {diff.numel()} elements differ"


def interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def cases_for(backend, device):
    """(size, densities): every density on small sizes; the big size (not under the slow Triton
    interpreter, which gets a few blocks with a masked tail instead) with the two that select."""
    if interpreted(backend, device):
        return [(1, DENSITIES), (7, DENSITIES), (2500, DENSITIES)]
    return [(1, DENSITIES), (7, DENSITIES), (4099, DENSITIES), (1000003, (1e-6, 0.2))]


def tie_heavy(n, dtype, device, gen):
    """Values from 7 levels: most elements tie, including at the threshold."""
    levels = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0])
    return levels[torch.randint(0, len(levels), (n,), generator=gen)].to(dtype).to(device)


# ---- magnitude_prune ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_magnitude_matches_reference(backend, device, dtype):
    gen = torch.Generator().manual_seed(1)
    for n, densities in cases_for(backend, device):
        for make in (lambda: torch.randn(n, generator=gen).to(dtype).to(device),
                     lambda: tie_heavy(n, dtype, device, gen)):
            x = make()
            for density in densities:
                got = pyfuse.magnitude_prune(x, density, backend=backend)
                assert_same_bits(got, ref.magnitude_prune(x, density))


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_magnitude_non_contiguous(backend, device, dtype):
    rows, cols = (40, 30) if interpreted(backend, device) else (700, 300)
    base = torch.randn(rows, cols, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    before = base.clone()
    for x in (base.t(), base[:, ::3], base[::2]):
        assert not x.is_contiguous()
        got = pyfuse.magnitude_prune(x, 0.2, backend=backend)
        assert got.shape == x.shape
        assert_same_bits(got, ref.magnitude_prune(x, 0.2))
    assert_same_bits(base, before)  # the input is never written


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_magnitude_ties_split_across_chunks(backend, device):
    """Many float32 elements share the threshold key across several 65536-element CPU chunks / GPU
    tiles, so the exact lowest-index tie rule needs the per-chunk tie prefix counts."""
    n = 3000 if interpreted(backend, device) else 400_000
    gen = torch.Generator().manual_seed(3)
    x = tie_heavy(n, torch.float32, device, gen) * (1 + torch.rand(n, generator=gen).to(device).lt(0.01))
    for density in (0.1, 0.33, 0.5, 0.77):
        assert_same_bits(pyfuse.magnitude_prune(x, density, backend=backend), ref.magnitude_prune(x, density))


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("density", [0.2, 0.9])
def test_magnitude_unrepresentative_sample(backend, device, density):
    """The CPU kernel guesses a key band from a sample: for n = 2**20, runs of 64 elements every 1024
    elements. Here those runs hold large values and everything else is small, so the guess misses and
    the exact fallback must take over. Other backends see one more ordinary input."""
    n = 3000 if interpreted(backend, device) else 1 << 20
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(n, generator=gen) * 1e-3
    sampled = torch.arange(n) % 1024 < 64
    x = torch.where(sampled, 1 + torch.rand(n, generator=gen), x).to(device)
    assert_same_bits(pyfuse.magnitude_prune(x, density, backend=backend), ref.magnitude_prune(x, density))


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "portable"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_avx512_pathss(dtype, avx512):
    """The CPU write pass collects the band's candidates with AVX-512 compress-stores when the CPU has
    them, else with a portable flag scan: both must equal the reference. Sorted input packs every
    candidate into a few chunks (their buffers must grow); n = 1000003 leaves a tail of 3 elements."""
    gen = torch.Generator().manual_seed(8)
    n = 1_000_003
    with cpu_avx512_paths(avx512) as used:
        if avx512 and not used:
            pytest.skip("this CPU has no AVX-512 F/BW/VL/DQ")
        for x in (torch.randn(n, generator=gen).to(dtype), torch.randn(n, generator=gen).sort().values.to(dtype)):
            for density in (0.2, 0.5):
                assert_same_bits(pyfuse.magnitude_prune(x, density, backend="cpu"), ref.magnitude_prune(x, density))


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
def test_magnitude_nan_is_largest(backend, device):
    x = torch.tensor([1.0, float("nan"), -2.0, 0.5, float("-inf"), float("nan"), 3.0], device=device)
    got = pyfuse.magnitude_prune(x, 3 / 7, backend=backend)  # k = 3: both NaN and -inf
    assert_same_bits(got, ref.magnitude_prune(x, 3 / 7))
    assert torch.isnan(got[[1, 5]]).all() and got[4] == float("-inf") and (got[[0, 2, 3, 6]] == 0).all()


@pytest.mark.parametrize("backend,device", [p for p in KERNEL_BACKEND_DEVICES if "triton" in str(p.values)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_select_on_deltas(backend, device, dtype):
    """kernels/select.py with a base (the merge's |x - base| keys, computed in fp32): threshold, tie
    counts and per-block tie prefix against a direct computation."""
    from pyfuse.kernels import select

    n, k, block = 2500, 700, 256
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(n, generator=gen).to(dtype)
    x = (base.float() + tie_heavy(n, torch.float32, "cpu", gen)).to(dtype)  # many equal deltas
    state, before = select.select_threshold(x.to(device), k, base.to(device), block=block)
    keys = ((x.float() - base.float()).abs().view(torch.int32).to(torch.int64) & 0x7FFFFFFF)
    t = int(torch.sort(keys, descending=True).values[k - 1])
    assert state.cpu().tolist()[:3] == [t, k - int((keys > t).sum()), int((keys == t).sum())]
    per_block = torch.nn.functional.pad(keys == t, (0, -n % block)).reshape(-1, block).sum(1)
    assert torch.equal(before.cpu(), torch.cumsum(per_block, 0) - per_block)


def numpy_magnitude_oracle(x: torch.Tensor, k: int) -> np.ndarray:
    """Independent statement of the rule: order by (-|x| key, index), keep the first k."""
    flat = x.reshape(-1).cpu()
    mask = 0x7FFFFFFF if x.dtype == torch.float32 else 0x7FFF
    key = flat.view(INT_VIEW[x.dtype]).numpy().astype(np.int64) & mask
    order = np.lexsort((np.arange(key.size), -key))  # last key is primary
    keep = np.zeros(key.size, dtype=bool)
    keep[order[:k]] = True
    return keep


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_reference_matches_numpy_oracle(dtype):
    gen = torch.Generator().manual_seed(4)
    for x in (torch.randn(5001, generator=gen).to(dtype), tie_heavy(5001, dtype, "cpu", gen)):
        for density in DENSITIES + [0.5]:
            k = math.floor(density * x.numel())
            keep = torch.from_numpy(numpy_magnitude_oracle(x, k))
            expected = torch.where(keep, x, torch.zeros_like(x))
            assert_same_bits(ref.magnitude_prune(x, density), expected)


def test_lowest_index_wins_ties():
    x = torch.tensor([1.0, -1.0, 0.5, 1.0, -1.0])  # four entries tie at |x| = 1
    assert pyfuse.magnitude_prune(x, 0.4).tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]


def peft_merge_utils():
    """PEFT's own peft/utils/merge_utils.py, loaded from its file: it needs only torch, while
    `import peft` pulls in transformers (about 10 s of this file's test budget)."""
    spec = importlib.util.find_spec("peft")
    if spec is None:
        pytest.skip("peft is not installed")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "merge_utils.py"
    module_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_magnitude_equals_peft_on_tie_free_data(backend, device):
    merge_utils = peft_merge_utils()
    gen = torch.Generator().manual_seed(5)
    n = 2400 if interpreted(backend, device) else 96 * 480
    # Distinct magnitudes by construction, random signs and order.
    mags = (torch.randperm(n, generator=gen).float() + 1) / n
    x = (mags * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)).reshape(-1, 48).to(device)
    for density in (0.0, 0.2, 0.5, 0.97):
        expected = merge_utils.magnitude_based_pruning(x, density)
        assert torch.equal(pyfuse.magnitude_prune(x, density, backend=backend), expected)


# ---- random_prune -------------------------------------------------------------------------------------

SEEDS = [0, 12345, 2**40 + 3, 2**63, -1]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_random_mask_matches_numpy_philox(backend, device):
    n = 2500 if interpreted(backend, device) else 20_011
    ones = torch.ones(n, device=device)
    for seed in SEEDS:
        for density in (0.0, 1.0, 0.2, 0.7):
            mask = pyfuse.random_prune(ones, density, seed=seed, rescale=False, backend=backend).cpu().numpy()
            u = ref_philox.rand_np(seed, np.arange(n, dtype=np.uint64), 0, pyfuse.prune.RANDOM_PRUNE_PURPOSE)
            assert np.array_equal(mask, (u < np.float32(density)).astype(np.float32)), (seed, density)


@pytest.mark.parametrize("backend,device", KERNEL_BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_random_matches_reference(backend, device, dtype):
    gen = torch.Generator().manual_seed(6)
    for n, densities in cases_for(backend, device):
        x = torch.randn(n, generator=gen).to(dtype).to(device)
        # The torch Philox reference is slow: one big call per dtype.
        for density in densities if n < 10**6 else (0.2,):
            for rescale in (True, False) if n < 10**6 else (True,):
                got = pyfuse.random_prune(x, density, seed=7, rescale=rescale, backend=backend)
                assert_same_bits(got, ref.random_prune(x, density, 7, rescale))
    view = torch.randn(50, 60, generator=gen).to(dtype).to(device).t()
    assert_same_bits(pyfuse.random_prune(view, 0.4, seed=8, backend=backend), ref.random_prune(view, 0.4, 8))



def test_random_kept_fraction_is_binomial():
    """Threshold: |kept - n p| <= 4 sqrt(n p (1 - p)) (two-sided p-value ~6e-5). A broken mask that
    compares with a slightly inflated density (p + 1%) must fail the same test."""
    n = 400_000
    x = torch.ones(n)
    for seed, p in ((1, 0.1), (2, 0.5), (3, 0.9)):
        kept = int(pyfuse.random_prune(x, p, seed=seed, rescale=False).count_nonzero())
        assert binomial_ok(kept, n, p, z=4), (seed, p, kept)
        u = ref_philox.rand_np(seed, np.arange(n, dtype=np.uint64), 0, pyfuse.prune.RANDOM_PRUNE_PURPOSE)
        assert not binomial_ok(int((u < p + 0.01).sum()), n, p, z=4)


def test_random_rescale_divides_by_density():
    x = torch.full((1000,), 3.0)
    out = pyfuse.random_prune(x, 0.25, seed=9)
    kept = out != 0
    assert kept.any() and torch.equal(out[kept], torch.full_like(out[kept], 12.0))


# ---- torch.library ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_opcheck(backend, device):
    x = torch.randn(33, 17, device=device)
    torch.library.opcheck(torch.ops.pyfuse.magnitude_prune.default, (x, 100, backend))
    torch.library.opcheck(torch.ops.pyfuse.random_prune.default, (x.to(torch.bfloat16), 0.3, -5, True, backend))


def test_torch_compile_fullgraph():
    x = torch.randn(64, 48)

    def fn(t):
        return pyfuse.magnitude_prune(t, 0.25) + pyfuse.random_prune(t, 0.5, seed=11)

    compiled = torch.compile(fn, fullgraph=True)
    assert_same_bits(compiled(x), fn(x))


# ---- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_density_value(density):
    x = torch.randn(10)
    with pytest.raises(ValueError, match="density"):
        pyfuse.magnitude_prune(x, density)
    with pytest.raises(ValueError, match="density"):
        pyfuse.random_prune(x, density, seed=0)


def test_bad_types():
    x = torch.randn(10)
    with pytest.raises(TypeError, match="density"):
        pyfuse.magnitude_prune(x, "0.5")
    for bad in (torch.arange(10), torch.ones(10, dtype=torch.float64), torch.ones(10, dtype=torch.bool)):
        with pytest.raises(TypeError, match="x"):
            pyfuse.magnitude_prune(bad, 0.5)
        with pytest.raises(TypeError, match="x"):
            pyfuse.random_prune(bad, 0.5, seed=0)
    with pytest.raises(TypeError, match="x"):
        pyfuse.magnitude_prune([1.0, 2.0], 0.5)
    for seed in (1.5, "3", None, True):
        with pytest.raises(TypeError, match="seed"):
            pyfuse.random_prune(x, 0.5, seed=seed)
    with pytest.raises(TypeError, match="rescale"):
        pyfuse.random_prune(x, 0.5, seed=0, rescale=1)


def test_wrong_device():
    with pytest.raises(pyfuse.BackendError, match="meta"):
        pyfuse.magnitude_prune(torch.empty(10, device="meta"), 0.5)
    with pytest.raises(pyfuse.BackendError, match="cuda"):
        pyfuse.random_prune(torch.randn(10), 0.5, seed=0, backend="cuda")


def test_empty_tensor():
    for backend in ("reference", "cpu"):
        x = torch.empty(0, 3)
        assert pyfuse.magnitude_prune(x, 0.5, backend=backend).shape == (0, 3)
        assert pyfuse.random_prune(x, 0.5, seed=1, backend=backend).shape == (0, 3)

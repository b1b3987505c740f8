"""Philox: bit equality of C++, numpy, torch reference and Triton, and equality with Triton's own tl.rand."""
import numpy as np
import pytest
import torch

import pyfuse
from pyfuse.reference import philox as ref
from helpers import BACKEND_DEVICES

try:
    import triton
    import triton.language as tl

    from pyfuse.kernels.philox import philox_packed_uniform
except ImportError:  # triton is optional
    triton = None

if triton is not None:  # kernels of test_packed_layout_is_tl_rand4x (module level: the jit resolves globals)

    @triton.jit
    def tl_rand4x_kernel(out, seed, offset, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        u0, u1, u2, u3 = tl.rand4x(seed, offset + i)
        tl.store(out + 4 * i, u0)
        tl.store(out + 4 * i + 1, u1)
        tl.store(out + 4 * i + 2, u2)
        tl.store(out + 4 * i + 3, u3)

    @triton.jit
    def packed_uniform_kernel(out, seed_lo, seed_hi, first, stream, purpose, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out + i, philox_packed_uniform(seed_lo, seed_hi, (first + i).to(tl.int64), stream, purpose))

SEEDS = [0, 1, 42, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**63 - 1, 2**63,
         2**64 - 1, -1, -(2**31), -(2**31) - 1, -(2**63)]
OFFSETS = [0, 5, 2**31 - 7, 2**32 - 3, 2**32 + 11, 2**62 + 1, 2**64 - 2]

KNOWN_ANSWERS = [  # Random123 philox4x32-10 vectors: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_known_answers(counter, key, expected):
    assert tuple(int(w) for w in ref.philox_np(*counter, *key)) == expected
    words = ref.philox_torch(*(torch.tensor([c]) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected
    assert pyfuse.backends()["cpu"].usable
    from pyfuse._ext import cpu_ext

    assert tuple(cpu_ext().philox4x32(*counter, *key, 10)) == expected


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("seed", SEEDS)
def test_rand_bit_identical(backend, device, seed):
    n = 257
    for offset in OFFSETS:
        got = pyfuse.rand(n, seed=seed, offset=offset, stream=3, device=device, backend=backend).cpu()
        index = (np.arange(n, dtype=np.uint64) + np.uint64(offset % 2**64))  # wraps mod 2**64
        expected = ref.rand_np(seed, index, stream=3)
        assert np.array_equal(got.numpy(), expected), (seed, offset)


@pytest.mark.parametrize("packed", [False, True], ids=["first_word", "packed"])
@pytest.mark.parametrize("isa,name", [(1, "avx512"), (2, "avx2"), (3, "scalar")])
def test_cpu_vector_paths_bit_identical(isa, name, packed):
    """Every CPU Philox path (AVX-512, AVX2, scalar; the widest one runs by default) equals numpy in both
    layouts, including partial vectors at the tail, counters whose low word wraps inside a vector, and (packed)
    runs that start and end inside a counter's four words."""
    from pyfuse._ext import cpu_ext

    oracle = ref.packed_rand_np if packed else ref.rand_np
    for seed in (0, 2**32 + 5, 2**64 - 1):
        for offset in (0, 2, 2**32 - 13, 2**34 - 3, 2**63 - 1001, 2**64 - 7):
            for n in (1, 3, 31, 33, 1000):
                if packed and offset + n > 2**64:
                    continue  # packed runs never wrap past element 2^64 - 1 (merge indices are < 2^63)
                out = torch.full((n,), -1.0)
                if not cpu_ext().rand_uniform(out.data_ptr(), n, seed % 2**64, offset, 5, isa, packed):
                    pytest.skip(f"this CPU has no {name}")
                index = np.arange(n, dtype=np.uint64) + np.uint64(offset)
                assert np.array_equal(out.numpy(), oracle(seed, index, stream=5)), (name, seed, offset, n)


def test_packed_layout_is_tl_rand4x():
    """The packed layout is tl.rand4x's four uniforms per counter in element order, in numpy, the torch
    reference and our Triton code (any stream and purpose), and differs from the first-word layout."""
    if triton is None:
        pytest.skip("triton not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in (0, 1, 2**31 - 1):
        for block in (0, 2**29 - 7):
            out = torch.empty(4 * 32, device=device)
            tl_rand4x_kernel[(1,)](out, seed, block, BLOCK=32)
            index = np.arange(4 * block, 4 * block + 128, dtype=np.uint64)
            assert np.array_equal(out.cpu().numpy(), ref.packed_rand_np(seed, index)), (seed, block)
    for seed in (5, 2**64 - 1):
        for first in (0, 3, 2**33 + 1):
            index = torch.arange(first, first + 64, dtype=torch.int64)
            expected = ref.packed_rand_np(seed, index.numpy().astype(np.uint64), 7, 2)
            assert np.array_equal(ref.packed_rand_torch(seed, index, 7, 2).numpy(), expected)
            out = torch.empty(64, device=device)
            packed_uniform_kernel[(1,)](out, seed & 0xFFFFFFFF, seed >> 32, first, 7, 2, BLOCK=64)
            assert np.array_equal(out.cpu().numpy(), expected), (seed, first)
            assert not np.array_equal(expected, ref.rand_np(seed, index.numpy().astype(np.uint64), 7, 2))


def test_rand_equals_triton_tl_rand():
    """Our pinned Philox equals Triton's own tl.rand for stream 0 (interpreter on CPU, or GPU)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def tl_rand_kernel(out, seed, offset, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out + i, tl.rand(seed, offset + i))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in (0, 1, 2**31 - 1, 2**40 + 3):
        for offset in (0, 2**31 - 100):
            out = torch.empty(128, device=device)
            tl_rand_kernel[(1,)](out, seed, offset, BLOCK=128)
            ours = pyfuse.rand(128, seed=seed, offset=offset, device=device, backend="reference")
            assert torch.equal(out, ours), (seed, offset)


def test_uniform_conversion_range():
    x = np.array([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0x80000001], dtype=np.uint64)
    u = ref.uint_to_uniform_np(x)
    assert u.min() == 0.0 and u.max() == np.float32(1 - 2**-24)
    assert np.array_equal(u, ref.uint_to_uniform_torch(torch.tensor(x.astype(np.int64))).numpy())


def test_rand_is_uniform():
    """Kolmogorov-Smirnov distance of 200k uniforms below the critical value 1.95/sqrt(n) (level 1e-3);
    a subtly broken generator (u ** 1.02, D about 0.0074) must fail the same test."""
    n = 200_000
    u = np.sort(pyfuse.rand(n, seed=7).numpy().astype(np.float64))
    grid = np.arange(1, n + 1) / n
    threshold = 1.95 / np.sqrt(n)
    assert np.max(np.abs(grid - u)) < threshold
    broken = np.sort(u ** 1.02)
    assert np.max(np.abs(grid - broken)) >= threshold


@pytest.mark.parametrize("kwargs,err", [
    ({"numel": -1, "seed": 0}, ValueError), ({"numel": 3, "seed": 1.5}, TypeError),
    ({"numel": 3, "seed": "1"}, TypeError), ({"numel": 3, "seed": True}, TypeError),
    ({"numel": 3, "seed": 0, "stream": 2**32}, ValueError), ({"numel": 3, "seed": 0, "offset": 0.5}, TypeError),
    ({"numel": 3, "seed": 0, "backend": "nope"}, pyfuse.BackendError),
])
def test_rand_bad_input(kwargs, err):
    n = kwargs.pop("numel")
    with pytest.raises(err):
        pyfuse.rand(n, **kwargs)


def test_rand_opcheck_and_compile():
    args = (33, 5, 2**32 + 1, 1, torch.device("cpu"), "cpu")
    torch.library.opcheck(torch.ops.pyfuse.rand.default, args)

    @torch.compile(fullgraph=True)
    def f():
        return pyfuse.rand(33, seed=5, offset=2**32 + 1, stream=1) * 2

    assert torch.equal(f(), pyfuse.rand(33, seed=5, offset=2**32 + 1, stream=1) * 2)

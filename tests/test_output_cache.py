"""Reuse of freed large CPU outputs (pyfuse/_output_cache.py): a buffer comes back only when nothing references
it, the byte limit holds, and a kernel writing into a reused buffer (filled with NaN first) gives the values a
fresh one gets."""
import sys
import threading
import time
import warnings

import pytest
import torch

import pyfuse
from pyfuse import _output_cache
from pyfuse._ext import HUGEPAGE_MIN_BYTES, new_output
from pyfuse.ensemble import synthetic_map, union_probs
from pyfuse.ensemble.maps import tables_for
from test_ensemble_ops import make_logits, small_map, special_first

LARGE = (64, HUGEPAGE_MIN_BYTES // 256)  # float32: exactly HUGEPAGE_MIN_BYTES


@pytest.fixture
def cache():
    if not _output_cache.reuse_supported():
        pytest.skip("this torch has no storage use count: outputs are never reused")
    old = _output_cache.CACHE.limit_bytes
    pyfuse.set_output_cache_limit(256 << 20)
    pyfuse.empty_output_cache()  # no free buffer left by another test
    yield _output_cache.CACHE
    pyfuse.set_output_cache_limit(old)


def test_freed_output_is_reused(cache):
    a = new_output(LARGE, torch.float32, "cpu")
    ptr, hits = a.data_ptr(), cache.hits
    del a
    b = new_output(LARGE, torch.float32, "cpu")
    assert b.data_ptr() == ptr and cache.hits == hits + 1
    assert b.shape == LARGE and b.is_contiguous() and not b._is_view()


def _typed_storage(a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage is deprecated, still reachable
        return a.storage()


HOLDERS = {
    "tensor": lambda a: a,
    "view": lambda a: a[1:3],
    "numpy": lambda a: a.numpy(),
    "dlpack": lambda a: torch.utils.dlpack.to_dlpack(a),
    "storage": lambda a: a.untyped_storage(),
    "typed_storage": lambda a: _typed_storage(a),
    "autograd": lambda a: (a.requires_grad_(True) ** 2).sum().grad_fn,  # saves a for the backward pass
}


@pytest.mark.parametrize("keep", list(HOLDERS))
def test_reachable_output_memory_is_never_reused(cache, keep):
    a = new_output(LARGE, torch.float32, "cpu")
    holder = HOLDERS[keep](a)
    ptr = a.data_ptr()
    del a
    hits = cache.hits
    b = new_output(LARGE, torch.float32, "cpu")
    assert b.data_ptr() != ptr and cache.hits == hits
    del holder


def test_output_moved_to_shared_memory_releases_its_buffer(cache):
    # share_memory_ copies the output into shared memory: the old buffer is free and reused, the copy intact.
    a = new_output(LARGE, torch.float32, "cpu")
    a.fill_(7.0)
    ptr, hits = a.data_ptr(), cache.hits
    a.share_memory_()
    assert a.is_shared() and a.data_ptr() != ptr
    b = new_output(LARGE, torch.float32, "cpu")
    assert b.data_ptr() == ptr and cache.hits == hits + 1
    b.fill_(-1.0)
    assert bool((a == 7.0).all())


def test_deterministic_fill_mode_gets_fresh_filled_outputs(cache):
    a = new_output(LARGE, torch.float32, "cpu")
    del a
    hits = cache.hits
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        b = new_output(LARGE, torch.float32, "cpu")
    finally:
        torch.use_deterministic_algorithms(old)
    assert cache.hits == hits and bool(b.isnan().all())


def test_storage_handles_see_only_their_own_output(cache):
    a = new_output(LARGE, torch.float32, "cpu")
    handle = a.untyped_storage()
    del a
    b = new_output(LARGE, torch.float32, "cpu")
    assert b.untyped_storage() is not handle and b.untyped_storage().data_ptr() != handle.data_ptr()


def test_threads_never_share_a_buffer(cache):
    # Each thread writes its own value into each output and checks it after letting the others run. A smoke
    # test: with the output built outside the cache's lock, a review saw 43 of 12000 outputs overwritten.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    bad = []

    def work(k):
        for _ in range(25):
            out = new_output(LARGE, torch.float32, "cpu")
            out[:, :64] = k
            time.sleep(0)
            if not bool((out[:, :64] == k).all()):
                bad.append(k)
            del out

    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert not bad and cache.hits > 0


def test_default_device_does_not_leak_in(cache):
    with torch.device("meta"):
        out = new_output(LARGE, torch.float32, "cpu")
    assert out.device.type == "cpu"


def test_lowering_the_limit_forgets_the_oldest(cache):
    a, b = new_output(LARGE, torch.float32, "cpu"), new_output(LARGE, torch.float32, "cpu")
    ptr_b = b.data_ptr()
    assert cache.held_bytes() == 2 * HUGEPAGE_MIN_BYTES
    pyfuse.set_output_cache_limit(HUGEPAGE_MIN_BYTES)
    assert cache.held_bytes() == HUGEPAGE_MIN_BYTES
    del a, b
    assert new_output(LARGE, torch.float32, "cpu").data_ptr() == ptr_b


def test_small_outputs_and_other_sizes_are_not_cached(cache):
    hits, held = cache.hits, cache.held_bytes()
    small = new_output((4, 1000), torch.float32, "cpu")
    assert cache.held_bytes() == held
    del small
    a = new_output(LARGE, torch.float32, "cpu")
    del a
    b = new_output((LARGE[0] + 1, LARGE[1]), torch.float32, "cpu")
    assert cache.hits == hits
    del b


def test_limit_is_held_and_zero_turns_reuse_off(cache):
    pyfuse.set_output_cache_limit(HUGEPAGE_MIN_BYTES)  # room for one buffer: the most recent output's
    a = new_output(LARGE, torch.float32, "cpu")
    b = new_output(LARGE, torch.float32, "cpu")  # a is forgotten (still alive), b kept
    ptr_b = b.data_ptr()
    assert cache.held_bytes() == HUGEPAGE_MIN_BYTES
    big = new_output((LARGE[0] * 2, LARGE[1]), torch.float32, "cpu")  # over the limit: not kept, b stays
    del a, b, big
    hits = cache.hits
    c = new_output(LARGE, torch.float32, "cpu")
    assert c.data_ptr() == ptr_b and cache.hits == hits + 1
    del c
    pyfuse.set_output_cache_limit(0)
    assert cache.held_bytes() == 0
    d = new_output(LARGE, torch.float32, "cpu")
    del d
    new_output(LARGE, torch.float32, "cpu")
    assert cache.hits == hits + 1 and cache.held_bytes() == 0


def test_empty_output_cache_drops_free_buffers(cache):
    a = new_output(LARGE, torch.float32, "cpu")
    del a
    assert cache.held_bytes() >= HUGEPAGE_MIN_BYTES
    pyfuse.empty_output_cache()
    assert cache.held_bytes() == 0


@pytest.mark.parametrize("limit", [-1, 1.5, True, "8"])
def test_bad_limit(limit):
    with pytest.raises(ValueError, match="limit_bytes"):
        pyfuse.set_output_cache_limit(limit)


@pytest.mark.parametrize("text", ["lots", "-3", "inf", "nan"])
def test_bad_environment_limit(monkeypatch, text):
    monkeypatch.setenv("PYFUSE_OUTPUT_CACHE_MB", text)
    with pytest.raises(ValueError, match="PYFUSE_OUTPUT_CACHE_MB"):
        _output_cache._limit_from_env()


@pytest.mark.parametrize("mode,absent,layout", [("prob", "zero", False), ("logprob", "renormalize", False),
                                                ("prob", "zero", True)])
def test_union_probs_into_a_reused_buffer(cache, mode, absent, layout):
    # B=64 x U=LARGE[1] float32 is exactly the smallest size that is cached. The first output is filled with NaN
    # before it is freed: any element the kernel does not write into the reused buffer shows up. layout: a map
    # numbered as VocabMap numbers it, where the kernel writes model 0's exponentials into the output first and
    # never reads the union ids model 0 lacks (U > LARGE[1]: still cached).
    if layout:
        vmap = special_first(synthetic_map((30000, 20000), seed=3))
        assert tables_for(vmap, "cpu").row_layout and vmap.union_size >= LARGE[1]
    else:
        vmap = small_map([30000, 20000], LARGE[1], seed=3)
    first = union_probs(make_logits(vmap, LARGE[0], torch.float32, "cpu", seed=1), vmap, mode=mode, absent=absent,
                        backend="cpu")
    ptr = first.data_ptr()
    first.fill_(float("nan"))
    del first
    logits = make_logits(vmap, LARGE[0], torch.float32, "cpu", seed=2)
    reused = union_probs(logits, vmap, mode=mode, absent=absent, backend="cpu")
    assert reused.data_ptr() == ptr
    pyfuse.set_output_cache_limit(0)
    fresh = union_probs(logits, vmap, mode=mode, absent=absent, backend="cpu")
    assert torch.equal(reused, fresh)


def _large_cpu_ops():
    """Every CPU op whose output can reach the cached size, as fn(seed) -> output (one per new_output caller)."""
    from pyfuse.merge import dare_ties, della, task_arithmetic, ties
    shape = (1024, HUGEPAGE_MIN_BYTES // 4096)  # float32 output of exactly HUGEPAGE_MIN_BYTES

    def tensor(seed):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def base_and_models(seed):  # a base and two models
        return tensor(seed), [tensor(seed + 1000), tensor(seed + 2000)]

    return {
        "rand": lambda s: pyfuse.rand(HUGEPAGE_MIN_BYTES // 4, seed=s, backend="cpu"),
        "magnitude_prune": lambda s: pyfuse.magnitude_prune(tensor(s), 0.3, backend="cpu"),
        "random_prune": lambda s: pyfuse.random_prune(tensor(s), 0.3, seed=s, backend="cpu"),
        "task_arithmetic": lambda s: task_arithmetic(*base_and_models(s), backend="cpu"),
        "ties": lambda s: ties(*base_and_models(s), density=0.3, backend="cpu"),
        "dare_ties": lambda s: dare_ties(*base_and_models(s), density=0.3, seed=s, backend="cpu"),
        "della": lambda s: della(*base_and_models(s), density=0.3, seed=s, backend="cpu"),
    }


@pytest.mark.parametrize("name", list(_large_cpu_ops()))
def test_every_large_cpu_output_is_whole_in_a_reused_buffer(cache, name):
    # A kernel that left part of its output unwritten (relying on a fresh page's zeros) fails here: the reused
    # buffer holds NaN from the first call.
    op = _large_cpu_ops()[name]
    first = op(1)
    assert first.nbytes == HUGEPAGE_MIN_BYTES
    ptr = first.data_ptr()
    first.fill_(float("nan"))
    del first
    reused = op(2)
    assert reused.data_ptr() == ptr
    pyfuse.set_output_cache_limit(0)
    assert torch.equal(reused, op(2))

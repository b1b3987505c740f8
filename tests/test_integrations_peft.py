"""pyfuse.integrations.peft against PEFT's own merge functions and LoraModel.add_weighted_adapter."""
from __future__ import annotations

import pytest
import torch

from pyfuse.integrations import peft as pp

peft = pytest.importorskip("peft", reason="PEFT is not installed")
from peft.tuners.lora import model as lora_model  # noqa: E402
from peft.utils import merge_utils as mu  # noqa: E402

from helpers import binomial_ok  # noqa: E402


def _tasks(k=3, shape=(37, 19), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(k)]


def _tie_free_bf16(k=3, n=200, seed=0):
    """bf16 task tensors whose magnitudes are distinct integers (exact in bf16 up to 256): no top-k ties."""
    g = torch.Generator().manual_seed(seed)
    sign = lambda: torch.randint(0, 2, (n,), generator=g) * 2 - 1  # noqa: E731
    return [((torch.randperm(n, generator=g) + 1) * sign()).to(torch.bfloat16).reshape(10, n // 10)
            for _ in range(k)]


WEIGHTS = torch.tensor([0.7, -0.3, 1.2])


# ---------------------------------------------------------------- deterministic methods: exact


@pytest.mark.parametrize("tasks", [_tasks(), _tie_free_bf16()], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 0.9])  # 0.001 * numel < 1: PEFT keeps nothing
def test_deterministic_methods_equal_peft(tasks, density):
    pairs = [(pp.task_arithmetic(tasks, WEIGHTS), mu.task_arithmetic(tasks, WEIGHTS)),
             (pp.magnitude_prune(tasks, WEIGHTS, density), mu.magnitude_prune(tasks, WEIGHTS, density))]
    for method in ("total", "frequency"):
        pairs.append((pp.ties(tasks, WEIGHTS, density, method), mu.ties(tasks, WEIGHTS, density, method)))
    for ours, theirs in pairs:
        assert ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs)


def test_density_one_warns_and_keeps_all():
    tasks = _tasks()
    with pytest.warns(UserWarning, match="greater than or equal to 1"):
        ours = pp.ties(tasks, WEIGHTS, 1.5)
    with pytest.warns(UserWarning):
        assert torch.equal(ours, mu.ties(tasks, WEIGHTS, 1.5))


def test_half_weights_follow_peft_dtype():
    tasks = _tie_free_bf16()
    w = WEIGHTS.to(torch.bfloat16)
    for ours, theirs in ((pp.magnitude_prune(tasks, w, 0.5), mu.magnitude_prune(tasks, w, 0.5)),
                         (pp.ties(tasks, w, 0.5), mu.ties(tasks, w, 0.5))):
        assert ours.dtype == theirs.dtype
    # PEFT rounds every product to bf16; pyfuse evaluates PEFT's formula in fp32 and rounds once at the end
    assert torch.equal(pp.magnitude_prune(tasks, w, 0.5), mu.magnitude_prune(tasks, w.float(), 0.5).to(w.dtype))
    assert torch.equal(pp.ties(tasks, w, 0.5), mu.ties(tasks, w.float(), 0.5))


# ---------------------------------------------------------------- DARE: PEFT's formula with pyfuse's mask


def _pyfuse_masks(tasks, density, seed):
    """Each model's pyfuse DARE keep mask, read off dare_linear with one-hot weights (tasks have no zeros)."""
    k = len(tasks)
    return [pp.dare_linear(tasks, torch.eye(k)[i], density, seed=seed) != 0 for i in range(k)]


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties-total", "dare_ties-frequency"])
def test_dare_equals_peft_formula_with_pyfuse_mask(monkeypatch, method):
    tasks, density, seed = _tasks(), 0.4, 1234
    masks = iter(_pyfuse_masks(tasks, density, seed))
    monkeypatch.setattr(torch, "bernoulli", lambda p: next(masks).to(p.dtype))  # PEFT draws one mask per tensor
    name, *election = method.split("-")
    theirs = getattr(mu, name)(tasks, WEIGHTS, density, *election)
    monkeypatch.undo()
    ours = getattr(pp, name)(tasks, WEIGHTS, density, *election, seed=seed)
    assert ours.dtype == theirs.dtype
    # PEFT divides by density, pyfuse multiplies by float32(1/density): a few ulps apart
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)



def test_dare_mask_density():
    tasks = _tasks(shape=(64, 64))
    masks = _pyfuse_masks(tasks, 0.3, seed=5)
    assert all(binomial_ok(int(m.sum()), m.numel(), 0.3) for m in masks)
    assert not torch.equal(masks[0], masks[1])  # one Philox stream per model
    # broken variant: masks drawn at density 0.35 must fail the same bound
    assert not all(binomial_ok(int(m.sum()), m.numel(), 0.3) for m in _pyfuse_masks(tasks, 0.35, seed=5))


def test_dare_seed_and_density_zero():
    tasks = _tasks()
    torch.manual_seed(3)
    a = pp.dare_ties(tasks, WEIGHTS, 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, pp.dare_ties(tasks, WEIGHTS, 0.5))  # unseeded: follows torch.manual_seed
    assert torch.equal(pp.dare_linear(tasks, WEIGHTS, 0.0, seed=1), torch.zeros_like(tasks[0]))  # PEFT: NaN


def test_bad_arguments():
    tasks = _tasks()
    with pytest.raises(ValueError, match="majority_sign_method"):
        pp.ties(tasks, WEIGHTS, 0.5, "median")
    with pytest.raises(ValueError, match="density"):
        pp.dare_linear(tasks, WEIGHTS, -0.1)
    with pytest.raises(TypeError, match="weights must be a torch.Tensor"):
        pp.task_arithmetic(tasks, [1.0, 1.0, 1.0])
    with pytest.raises(TypeError, match="task_tensors"):
        pp.task_arithmetic([], WEIGHTS)


# ---------------------------------------------------------------- patch() and add_weighted_adapter


def test_patch_rebinds_and_restores():
    originals = {n: getattr(lora_model, n) for n in pp._NAMES}
    with pp.patch():
        pp.patch()  # idempotent
        assert all(getattr(lora_model, n) is getattr(pp, n) for n in pp._NAMES)
    assert all(getattr(lora_model, n) is originals[n] for n in pp._NAMES)
    pp.patch()
    pp.unpatch()
    pp.unpatch()  # no-op when not patched
    assert all(getattr(lora_model, n) is originals[n] for n in pp._NAMES)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(12, 10)
        self.v = torch.nn.Linear(10, 12)

    def forward(self, x):
        return self.v(self.q(x))


def _lora_net():
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False)
    model = peft.get_peft_model(_Net(), config, adapter_name="first")
    model.add_adapter("second", config)  # init_lora_weights=False: random A and B, so every delta is non-zero
    return model


def _merged_adapter(model, name):
    return {k: v.clone() for k, v in model.state_dict().items() if f".{name}." in k}


@pytest.mark.parametrize("combination_type, function", [("ties", "ties"), ("magnitude_prune", "magnitude_prune"),
                                                       ("linear", "task_arithmetic")])
def test_add_weighted_adapter_same_under_patch(monkeypatch, combination_type, function):
    model = _lora_net()
    model.add_weighted_adapter(["first", "second"], [0.7, 0.4], "peft_own", combination_type=combination_type,
                               density=0.5)
    calls = []
    original = getattr(pp, function)
    monkeypatch.setattr(pp, function, lambda *a, **k: calls.append(1) or original(*a, **k))  # bound by patch()
    with pp.patch():
        model.add_weighted_adapter(["first", "second"], [0.7, 0.4], "pyfuse", combination_type=combination_type,
                                   density=0.5)
    theirs, ours = _merged_adapter(model, "peft_own"), _merged_adapter(model, "pyfuse")
    assert len(calls) == 4 and len(ours) == 4  # lora_A and lora_B of both layers went through pyfuse
    for k, v in theirs.items():
        assert torch.equal(ours[k.replace(".peft_own.", ".pyfuse.")], v), k

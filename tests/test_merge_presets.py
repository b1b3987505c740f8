"""Named presets (mergekit semantics) and whole-model merging (merge_state_dicts / merge_models)."""
from __future__ import annotations

import functools
import inspect
import math

import pytest
import torch

import pyfuse
from pyfuse.merge import models as merge_models_module
from pyfuse.merge.presets import FUNCTIONS, PRESETS
from helpers import assert_close, binomial_ok

BACKENDS = ["reference", "cpu"]  # the presets only map knobs; test_merge.py covers every backend
DETERMINISTIC = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]
RANDOM = ["dare_linear", "dare_ties", "della", "della_linear"]


def _inputs(k=3, shape=(33, 17), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + torch.randn(shape, generator=g) for _ in range(k)]
    return base.to(dtype), [m.to(dtype) for m in models]


def _mergekit_merge(name, base, models, **params):
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors([base, *models], base_index=0, name="t")
    return registry.get(name)([group], parameters=params)[0]


# ---------------------------------------------------------------- the table is mergekit's


def test_presets_carry_mergekit_defaults():
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    for name, preset in PRESETS.items():
        method = registry.get(name)
        consensus = "none" if method.consensus_method is None else method.consensus_method.value
        assert preset.consensus == consensus, name
        assert (preset.normalize, preset.rescale) == (method.default_normalize, method.default_rescale), name
        defaults = {p.name: p.default for p in method.spec.parameters}
        signature = inspect.signature(FUNCTIONS[name]).parameters
        for knob in ("normalize", "rescale", "density", "gamma", "epsilon"):
            if knob in defaults and knob in signature:
                assert signature[knob].default == defaults[knob], (name, knob)
        # every YAML knob that has an effect is a keyword of the preset (weight -> weights, lambda -> lam);
        # int8_mask only saves memory, density and rescale do nothing without a sparsifier
        ignored = {"int8_mask"} | ({"density", "rescale"} if method.sparsification_method is None else set())
        aliases = {"weight": "weights", "lambda": "lam"}
        for knob in set(defaults) - ignored:
            assert aliases.get(knob, knob) in signature, (name, knob)


# ---------------------------------------------------------------- deterministic presets == mergekit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", DETERMINISTIC)
@pytest.mark.parametrize("variant", ["defaults", "flipped"])
def test_deterministic_presets_match_mergekit(name, backend, variant):
    base, models = _inputs()
    weights = [0.7, -0.4, 1.3]
    knobs = {"weights": weights, "lam": 0.8}
    params = {"weight": weights, "lambda": 0.8}
    if name != "task_arithmetic":
        knobs["density"] = params["density"] = [0.5, 0.3, 0.001]  # 0.001 * 561 < 1: k_min_one keeps one
    if name.startswith("breadcrumbs"):
        knobs["gamma"] = params["gamma"] = 0.05
    if variant == "flipped":  # the boolean knobs away from their defaults
        p = PRESETS[name]
        flipped = {"normalize": not p.normalize} if name == "task_arithmetic" else \
            {"normalize": not p.normalize, "rescale": not p.rescale}
        knobs.update(flipped)
        params.update(flipped)
    out = FUNCTIONS[name](base, models, backend=backend, **knobs)
    assert_close(out, _mergekit_merge(name, base, models, **params))


def test_task_arithmetic_bf16_matches_mergekit_within_rounding():
    base, models = _inputs(dtype=torch.bfloat16)
    out = pyfuse.task_arithmetic(base, models, [0.5, 0.25, 0.25])
    expected = _mergekit_merge("task_arithmetic", base, models, weight=[0.5, 0.25, 0.25])
    assert out.dtype == torch.bfloat16
    assert_close(out, expected)


# ---------------------------------------------------------------- random presets: structure and statistics



@pytest.mark.parametrize("name", RANDOM)
def test_random_presets_keep_density_and_restore_l1(name):
    _, models = _inputs(k=1, shape=(64, 50))
    base = torch.zeros_like(models[0])  # so that out - base is the rescaled delta without rounding
    delta = models[0].reshape(-1)
    out = FUNCTIONS[name](base, models, density=0.3, seed=7)
    kept_delta = (out - base).reshape(-1)
    kept = kept_delta != 0
    # mergekit's rescale restores each task vector's L1 norm (not 1/density)
    assert math.isclose(kept_delta.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-4)
    ratio = kept_delta[kept] / delta[kept]
    assert_close(ratio, torch.full_like(ratio, ratio[0].item()))
    assert binomial_ok(int(kept.sum()), delta.numel(), 0.3)
    # the broken variant: a mask drawn at density 0.4 must fail the same bound
    broken = FUNCTIONS[name](base, models, density=0.4, seed=7)
    assert not binomial_ok(int(((broken - base) != 0).sum()), delta.numel(), 0.3)


def test_della_keeps_large_magnitudes_more_often():
    """DELLA's keep probability rises linearly with the magnitude rank inside each row: 0.3 -/+ 0.2 here,
    so the lowest and highest fifths of the ranks keep ~0.14 and ~0.46 (bounds: 5 sigma binomial)."""
    base, models = _inputs(k=1, shape=(400, 50))

    def fifths_ok(out) -> bool:
        delta = models[0] - base
        rank = delta.abs().argsort(dim=1, stable=True).argsort(dim=1).float() / 49
        kept = (out - base) != 0
        ok = True
        for lo, hi in ((0.0, 0.2), (0.8, 1.0)):
            sel = (rank >= lo) & (rank <= hi)
            p = 0.1 + 0.4 * rank[sel].mean().item()
            ok &= binomial_ok(int(kept[sel].sum()), int(sel.sum()), p)
        return ok

    assert fifths_ok(pyfuse.della_linear(base, models, density=0.3, epsilon=0.2, seed=3))
    # broken variant: a flat keep probability (DARE at the same density) fails the same test
    assert not fifths_ok(pyfuse.dare_linear(base, models, density=0.3, seed=3))


def test_random_presets_are_seeded():
    base, models = _inputs(k=2)
    a = pyfuse.dare_ties(base, models, density=0.5, seed=11)
    assert torch.equal(a, pyfuse.dare_ties(base, models, density=0.5, seed=11))
    assert not torch.equal(a, pyfuse.dare_ties(base, models, density=0.5, seed=12))
    torch.manual_seed(5)
    b = pyfuse.della(base, models, density=0.5, epsilon=0.1)
    torch.manual_seed(5)
    assert torch.equal(b, pyfuse.della(base, models, density=0.5, epsilon=0.1))


def test_preset_compiles_fullgraph():
    base, models = _inputs(k=2, shape=(40, 8))
    fn = torch.compile(lambda b, m0, m1: pyfuse.dare_ties(b, [m0, m1], [0.6, 0.4], density=0.5, seed=1),
                       fullgraph=True)  # inductor
    assert torch.equal(fn(base, *models), pyfuse.dare_ties(base, models, [0.6, 0.4], density=0.5, seed=1))


def test_preset_bad_arguments():
    base, models = _inputs(k=2)
    with pytest.raises(TypeError, match="normalize"):
        pyfuse.ties(base, models, normalize="yes")
    with pytest.raises(TypeError, match="seed"):
        pyfuse.ties(base, models, seed=1)  # deterministic presets take no seed
    with pytest.raises(ValueError, match="density"):
        pyfuse.dare_linear(base, models, density=1.5)


# ---------------------------------------------------------------- merge_state_dicts / merge_models


class Tiny(torch.nn.Module):
    def __init__(self, seed: int, tie: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(11, 6)
        self.lin = torch.nn.Linear(6, 5)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.norm = torch.nn.BatchNorm1d(5)
        self.norm.num_batches_tracked.fill_(seed + 1)
        self.norm.running_mean.normal_()
        if tie:
            self.head.weight = self.emb.weight


def _float_keys(sd):
    return [k for k, t in sd.items() if t.is_floating_point()]


def test_merge_state_dicts_merges_floats_and_copies_the_rest():
    base, m1, m2 = (Tiny(i).state_dict() for i in range(3))
    out = pyfuse.merge_state_dicts(base, [m1, m2], "ties", weights=[0.6, 0.4], density=0.5, progress=False)
    assert list(out) == list(base)
    for k in _float_keys(base):
        assert torch.equal(out[k], pyfuse.ties(base[k], [m1[k], m2[k]], [0.6, 0.4], density=0.5)), k
    nbt = "norm.num_batches_tracked"
    assert torch.equal(out[nbt], base[nbt]) and out[nbt].data_ptr() != base[nbt].data_ptr()


def test_merge_state_dicts_seeds_each_tensor_by_name():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(30, 20, generator=g)
    base = {"a": torch.zeros(30, 20), "b": torch.zeros(30, 20)}
    sd = {"a": delta.clone(), "b": delta.clone()}
    out = pyfuse.merge_state_dicts(base, [sd], "dare_linear", density=0.5, seed=4, progress=False)
    assert not torch.equal(out["a"] != 0, out["b"] != 0)  # equal shapes, distinct Philox keys
    flipped = pyfuse.merge_state_dicts(dict(reversed(base.items())), [dict(reversed(sd.items()))], "dare_linear",
                                       density=0.5, seed=4, progress=False)
    assert all(torch.equal(out[k], flipped[k]) for k in out)  # independent of the key order


def _spy(monkeypatch):
    calls = []
    original = merge_models_module.FUNCTIONS["ties"]

    @functools.wraps(original)  # keeps the signature the knob check reads
    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setitem(merge_models_module.FUNCTIONS, "ties", spy)
    return calls


@pytest.mark.parametrize("problem, error, match", [
    ("missing", ValueError, r"sds\[1\] lacks 1 key\(s\).*'norm.running_var'"),
    ("extra", ValueError, r"sds\[1\] has 1 key\(s\) not in base_sd.*'extra'"),
    ("shape", ValueError, r"'norm.running_var': sds\[1\] has shape \(4,\), base has \(5,\)"),
    ("dtype", ValueError, r"'norm.running_var': sds\[1\] has dtype torch.float16"),
    ("method", ValueError, "method must be one of"),
    ("knob", TypeError, "invalid knobs for method 'ties'"),
])
def test_mismatches_raise_before_any_work(monkeypatch, problem, error, match):
    calls = _spy(monkeypatch)
    base, m1, m2 = (Tiny(i).state_dict() for i in range(3))
    method, knobs = "ties", {}
    last = "norm.running_var"  # the last float key: a lazy check would have merged the others first
    if problem == "missing":
        del m2[last]
    elif problem == "extra":
        m2["extra"] = torch.zeros(1)
    elif problem == "shape":
        m2[last] = torch.zeros(4)
    elif problem == "dtype":
        m2[last] = m2[last].half()
    elif problem == "method":
        method = "slerp"
    else:
        knobs = {"gamma": 0.1}
    with pytest.raises(error, match=match):
        pyfuse.merge_state_dicts(base, [m1, m2], method, progress=False, **knobs)
    assert calls == []


def test_merge_models_checks_before_any_work(monkeypatch):
    calls = _spy(monkeypatch)
    base, other = Tiny(0), Tiny(1)
    other.norm = torch.nn.BatchNorm1d(4)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"'norm.weight': sds\[1\] has shape \(4,\), base has \(5,\)"):
        pyfuse.merge_models(base, [Tiny(2), other], "ties", inplace=True, progress=False)
    with pytest.raises(TypeError, match="invalid knobs"):
        pyfuse.merge_models(base, [Tiny(2)], "ties", inplace=True, seed=1, progress=False)
    with pytest.raises(TypeError, match=r"models\[0\] must be a torch.nn.Module"):
        pyfuse.merge_models(base, [Tiny(2).state_dict()], "ties")
    assert calls == []
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_merge_models_copy_and_inplace():
    base, models = Tiny(0), [Tiny(1), Tiny(2)]
    before = {k: v.clone() for k, v in base.state_dict().items()}
    expected = pyfuse.merge_state_dicts(base.state_dict(), [m.state_dict() for m in models], "breadcrumbs",
                                        density=0.6, gamma=0.1, progress=False)
    merged = pyfuse.merge_models(base, models, "breadcrumbs", density=0.6, gamma=0.1, progress=False)
    assert merged is not base
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # base untouched
    assert all(torch.equal(v, expected[k]) for k, v in merged.state_dict().items())
    same = pyfuse.merge_models(base, models, "breadcrumbs", inplace=True, density=0.6, gamma=0.1, progress=False)
    assert same is base
    assert all(torch.equal(v, expected[k]) for k, v in base.state_dict().items())
    assert base.norm.num_batches_tracked.item() == 1  # non-float buffer kept from the base


def test_tied_weights_are_merged_once():
    base, models = Tiny(0, tie=True), [Tiny(1, tie=True), Tiny(2, tie=True)]
    w = [base.emb.weight.detach().clone()] + [m.emb.weight.detach() for m in models]
    pyfuse.merge_models(base, models, "task_arithmetic", inplace=True, progress=False)
    assert base.head.weight is base.emb.weight
    assert torch.equal(base.emb.weight, pyfuse.task_arithmetic(w[0], w[1:]))  # not merged twice
    with pytest.raises(ValueError, match="ties 'head.weight' to 'emb.weight'.*sds\\[1\\] does not"):
        pyfuse.merge_models(Tiny(0, tie=True), [Tiny(1, tie=True), Tiny(2)], "ties", progress=False)


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    base, m1 = Tiny(0).state_dict(), Tiny(1).state_dict()
    pyfuse.merge_state_dicts(base, [m1], "task_arithmetic")
    assert "pyfuse task_arithmetic" in capsys.readouterr().err

"""pyfuse.integrations.mergekit: registry replacement and ``pyfuse-mergekit`` vs ``mergekit-yaml`` end to end
on tiny Llama-shaped checkpoints built here (float32)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mergekit", reason="mergekit is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
import yaml  # noqa: E402  (a mergekit dependency)
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.scripts.run_yaml import main as mergekit_yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pyfuse.integrations import mergekit as pm  # noqa: E402
from pyfuse.merge.presets import PRESETS  # noqa: E402
from helpers import assert_close, binomial_ok  # noqa: E402

FLAGS = ["--quiet", "--no-copy-tokenizer", "--no-write-model-card"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    paths = []
    for i in range(3):
        torch.manual_seed(i)
        path = root / f"model{i}"
        transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
        paths.append(str(path))
    return paths


def _load(path) -> dict:
    out = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _merge(tmp_path, tool: str, method: str, checkpoints, params: list[dict], seed=None, **shared) -> dict:
    out = tmp_path / f"{tool}-{method}-{len(list(tmp_path.iterdir()))}"
    config = {"merge_method": method, "base_model": checkpoints[0], "dtype": "float32",
              "models": [{"model": m, "parameters": p} for m, p in zip(checkpoints[1:], params)]}
    if shared:
        config["parameters"] = shared
    config_file = tmp_path / f"{out.name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    args = [str(config_file), str(out), *FLAGS, *(["--random-seed", str(seed)] if seed is not None else [])]
    if tool == "mergekit":
        mergekit_yaml.main(args, standalone_mode=False)
    else:
        with pytest.raises(SystemExit) as exit_info:
            pm.main(args)
        assert exit_info.value.code == 0
    return _load(out)


@pytest.fixture
def pyfuse_calls(monkeypatch):
    """Counts the tensors the installed methods hand to pyfuse (proves pyfuse, not mergekit, merged)."""
    calls = []
    original = pm.gta_merge
    monkeypatch.setattr(pm, "gta_merge", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_install_replaces_methods_with_identical_specs():
    originals = {name: registry.get(name) for name in PRESETS}
    with pm.install(seed=3):
        pm.install(seed=4)  # re-installing only changes the seed
        for name, original in originals.items():
            method = registry.get(name)
            assert isinstance(method, pm.PyfuseTaskArithmeticMerge) and method.seed == 4
            assert method.spec == original.spec  # same YAML parameters and defaults
    assert all(registry.get(name) is original for name, original in originals.items())
    pm.uninstall()  # no-op when not installed
    assert all(registry.get(name) is original for name, original in originals.items())


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"])
def test_yaml_deterministic_methods_match_mergekit(tmp_path, checkpoints, pyfuse_calls, method):
    params = [{"weight": 0.7, "density": 0.5}, {"weight": 0.5, "density": 0.3}]
    if method.startswith("breadcrumbs"):
        params = [dict(p, gamma=0.05) for p in params]
    theirs = _merge(tmp_path, "mergekit", method, checkpoints, params, **{"lambda": 0.9})
    assert pyfuse_calls == []
    ours = _merge(tmp_path, "pyfuse", method, checkpoints, params, **{"lambda": 0.9})
    assert len(pyfuse_calls) == len(theirs)
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert_close(ours[k], theirs[k])



def _check_random_merge(base: dict, model: dict, merged: dict, scale: float, density: float) -> bool:
    """One model merged into base: about density of the matrix elements changed (binomial bound), and each
    merged task vector has the model's L1 norm times scale (mergekit's rescale; scale = the weight, or 1
    when normalized by it)."""
    changed = n = 0
    for k, b in base.items():
        delta, merged_delta = model[k] - b, merged[k] - b
        if b.dim() == 2:
            changed += int((merged_delta != 0).sum())
            n += b.numel()
        if not math.isclose(merged_delta.abs().sum().item(), scale * delta.abs().sum().item(), rel_tol=1e-3,
                            abs_tol=1e-5):
            return False
    return binomial_ok(changed, n, density)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_yaml_random_methods_structure_and_statistics(tmp_path, checkpoints, pyfuse_calls, method):
    base, model = _load(checkpoints[0]), _load(checkpoints[1])
    params = [{"weight": 0.8, "density": 0.3, **({"epsilon": 0.1} if method.startswith("della") else {})}]
    theirs = _merge(tmp_path, "mergekit", method, checkpoints[:2], params, seed=7)
    ours = _merge(tmp_path, "pyfuse", method, checkpoints[:2], params, seed=7)
    assert len(pyfuse_calls) == len(theirs)
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in theirs)
    scale = 1.0 if PRESETS[method].normalize else 0.8
    assert _check_random_merge(base, model, theirs, scale, 0.3)
    assert _check_random_merge(base, model, ours, scale, 0.3)
    # broken variant: a merge at density 0.4 must fail the same check
    broken = _merge(tmp_path, "pyfuse", method, checkpoints[:2], [dict(params[0], density=0.4)], seed=7)
    assert not _check_random_merge(base, model, broken, scale, 0.3)


def test_random_seed_keys_the_philox_masks(tmp_path, checkpoints):
    params = [{"weight": 1.0, "density": 0.5}]
    a = _merge(tmp_path, "pyfuse", "dare_linear", checkpoints[:2], params, seed=1)
    assert all(torch.equal(a[k], v) for k, v in _merge(tmp_path, "pyfuse", "dare_linear", checkpoints[:2], params,
                                                        seed=1).items())
    b = _merge(tmp_path, "pyfuse", "dare_linear", checkpoints[:2], params, seed=2)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])
    # equally shaped tensors get their own masks (the key mixes in the tensor name)
    base = _load(checkpoints[0])
    kept = [a[f"model.layers.{i}.self_attn.q_proj.weight"] != base[f"model.layers.{i}.self_attn.q_proj.weight"]
            for i in (0, 1)]
    assert not torch.equal(*kept)


@pytest.mark.parametrize("method, params", [
    ("ties", {"density": [1.5, -0.5]}),  # >= 1 keeps all, <= 0 keeps nothing
    ("ties", {"density": [0.001, 0.3], "rescale": True}),  # k_min_one, l1 rescale of a magnitude mask
    ("breadcrumbs_ties", {"density": [0.3, 0.9], "gamma": [2.0, 0.2]}),  # gamma >= 1 acts like 1
    ("task_arithmetic", {"normalize": True, "lambda": -0.5}),
])
def test_registry_call_matches_mergekit_on_edge_knobs(method, params):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(23, 11, generator=g) for _ in range(3)]
    group = TensorGroup.from_tensors(tensors, base_index=0, name="w")
    params = {"weight": [0.6, 0.5], **params}
    expected = registry.get(method)([group], parameters=params)[0]
    with pm.install():
        assert_close(registry.get(method)([group], parameters=params)[0], expected)


def test_float64_falls_back_to_mergekit():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(9, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    group = TensorGroup.from_tensors(tensors, base_index=0, name="w")
    params = {"weight": [0.6, 0.4], "density": 0.5}
    expected = registry.get("ties")([group], parameters=params)[0]
    with pm.install(), pytest.warns(UserWarning, match="float64 tensors are merged by mergekit's own"):
        assert torch.equal(registry.get("ties")([group], parameters=params)[0], expected)


def test_main_help_and_cleanup(capsys):
    originals = {name: registry.get(name) for name in PRESETS}
    with pytest.raises(SystemExit) as exit_info:
        pm.main(["--help"])
    assert exit_info.value.code == 0
    assert "pyfuse-mergekit" in capsys.readouterr().out
    assert all(registry.get(name) is original for name, original in originals.items())


def test_importing_pyfuse_imports_neither_peft_nor_mergekit():
    code = ("import sys, pyfuse, pyfuse.integrations, pyfuse.integrations.peft; pyfuse.ties; pyfuse.merge_models; "
            "print(sorted(m for m in ('peft', 'mergekit') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "[]"

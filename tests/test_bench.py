"""The benchmark harness (`pyfuse bench`, `pyfuse info`) on a fake family, so no real kernel is timed."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

import pyfuse
from pyfuse import cli
from pyfuse.bench import measure, registry, report, runner
from pyfuse.bench.registry import BenchCase

MB = 10**6


def _broken():
    raise RuntimeError("deliberately broken provider")


def _fake_cases(device, quick):
    x = torch.ones(1000 if quick else 4000, device=device)
    yield BenchCase(
        family="fake", op="double", params=f"n={x.numel()} float32", bytes_floor=2 * x.numel() * 4,
        providers={
            "pyfuse:cpu": lambda: x * 2,
            "reference": lambda: x + x,
            "slowpeer": lambda: (time.sleep(0.002), x * 2)[1],
            "broken": _broken,
        },
        peers=("slowpeer", "missingpeer", "broken"),
        skipped={"missingpeer": "missingpeer is not installed"},
    )


def _failing_cases(device, quick):
    yield from _fake_cases(device, quick)
    raise ValueError("generator gave up")


@pytest.fixture
def fake_family(monkeypatch):
    """Only the fake families are registered; the copy-bandwidth buffer is small to keep the test fast."""
    registry.discover()  # real case modules register now, into the real registry, not into the patched one
    monkeypatch.setattr(registry, "_GENERATORS", {"fake": [_fake_cases], "failing": [_failing_cases]})
    copy = measure.copy_bandwidth
    monkeypatch.setattr(measure, "copy_bandwidth", lambda device: copy(device, nbytes=8 << 20, reps=3))


@pytest.fixture(scope="module")
def fake_report():
    with pytest.MonkeyPatch.context() as mp:
        registry.discover()
        mp.setattr(registry, "_GENERATORS", {"fake": [_fake_cases]})
        copy = measure.copy_bandwidth
        mp.setattr(measure, "copy_bandwidth", lambda device: copy(device, nbytes=8 << 20, reps=3))
        steps = []
        rep = runner.run("cpu", quick=True, step=steps.append)
    assert steps[0] == "copy bandwidth" and any("pyfuse:cpu" in s for s in steps)
    return rep


def _by_provider(rep):
    return {r.provider: r for r in rep.results}


def test_results_and_peer_ratio(fake_report):
    res = _by_provider(fake_report)
    assert set(res) == {"pyfuse:cpu", "reference", "slowpeer"}
    fast, peer = res["pyfuse:cpu"], res["slowpeer"]
    # speed-up = peer time / pyfuse time, only against peers that ran, only for pyfuse providers
    assert fast.speedup == {"slowpeer": peer.median_s / fast.median_s}
    assert res["reference"].speedup == {} and peer.speedup == {}
    assert fast.gbps == pytest.approx(2 * 1000 * 4 / fast.median_s / 1e9)  # bytes_floor / median
    assert fast.pct_copy == pytest.approx(100 * fast.gbps / fake_report.copy["median_gbps"])
    floor_s = 2 * 1000 * 4 / (fake_report.copy["median_gbps"] * 1e9)  # the floor bytes at the copy bandwidth
    assert fast.floor_multiple == pytest.approx(fast.median_s / floor_s)
    assert all(r.reps >= 1 and r.median_s > 0 for r in fake_report.results)
    assert fake_report.copy["median_gbps"] > 0


def test_skipped_and_failed_providers_reported(fake_report):
    skips = {(s.provider, s.failed): s for s in fake_report.skipped}
    assert skips[("missingpeer", False)].reason == "missingpeer is not installed"
    assert "deliberately broken provider" in skips[("broken", True)].reason
    assert skips[("broken", True)].case == "fake/double[n=1000 float32]"


@pytest.mark.parametrize("rich_installed", [True, False])
def test_table(fake_report, monkeypatch, capsys, rich_installed):
    if not rich_installed:
        for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")] + ["rich"]:
            monkeypatch.setitem(sys.modules, name, None)  # `import rich.*` raises ImportError: plain table
    report.print_table(fake_report)
    out = capsys.readouterr().out
    assert ("┃" in out) == rich_installed
    for text in ("fake/double[n=1000 float32]", "pyfuse:cpu", "slowpeer", "x vs slowpeer", "copy bandwidth",
                 "skipped missingpeer", "FAILED broken", "missingpeer is not installed", "VmHWM"):
        assert text in out, text


def test_json(fake_report, tmp_path):
    path = tmp_path / "bench.json"
    report.write_json(fake_report, str(path))
    data = json.loads(path.read_text())
    assert data["device"] == "cpu" and data["quick"] is True
    assert data["memory_method"] == measure.MEMORY_METHOD_CPU
    row = next(r for r in data["results"] if r["provider"] == "pyfuse:cpu")
    assert row["case"] == "fake/double[n=1000 float32]" and set(row["speedup"]) == {"slowpeer"}
    assert {"provider": "missingpeer", "reason": "missingpeer is not installed", "failed": False,
            "case": "fake/double[n=1000 float32]"} in data["skipped"]


def test_generator_failure_is_reported_and_others_run(fake_family):
    rep = runner.run("cpu", quick=True)
    failed = [s for s in rep.skipped if s.provider == "*"]
    assert len(failed) == 1 and failed[0].case == "failing" and "generator gave up" in failed[0].reason
    # both generators' first case ran, the failing one up to its error
    assert sum(r.provider == "pyfuse:cpu" for r in rep.results) == 2


def test_filter_and_family(fake_family):
    assert runner.run("cpu", quick=True, family="fake", filter="no such case").results == []
    assert {r.family for r in runner.run("cpu", quick=True, family="fake").results} == {"fake"}


def test_peak_extra_memory_sees_a_100mb_temporary():
    """Threshold: a 100 MB temporary reads as 95-110 MB; the same 100 MB returned as output reads < 5 MB."""
    if measure.cpu_peak_supported():
        pytest.skip(measure.cpu_peak_supported())

    def temporary():
        return torch.ones(25_000_000).sum()  # 100 MB float32, freed before returning

    def output():
        return torch.ones(25_000_000)

    assert 95 * MB <= measure.peak_extra_bytes(temporary, "cpu") <= 110 * MB
    assert measure.peak_extra_bytes(output, "cpu") < 5 * MB


def test_time_call_repetitions():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.02)

    # A call slower than twice the budget is timed once (after its warm-up), whatever min_reps says.
    t = measure.time_call(slow, "cpu", budget_s=0.01, min_reps=5)
    assert t.reps == 1 and len(calls) == 2 and t.median_s >= 0.02 and t.peak_extra_bytes is None
    # A slow call's memory is measured during that timed call: no extra call.
    calls.clear()
    t = measure.time_call(slow, "cpu", budget_s=0.01, min_reps=5, memory=True)
    assert t.reps == 1 and len(calls) == 2
    assert (t.peak_extra_bytes is not None) == (measure.cpu_peak_supported() == "")
    # A fast call's memory costs one more call, outside the timed ones.
    calls.clear()
    t = measure.time_call(lambda: calls.append(1), "cpu", budget_s=float("inf"), max_reps=4, memory=True)
    assert t.reps == 4 and len(calls) == 1 + 4 + 1
    t = measure.time_call(lambda: None, "cpu", budget_s=0.0, min_reps=3)
    assert t.reps == 1


def test_time_interleaved_alternates_rounds():
    calls = []

    def provider(name):
        return lambda: calls.append(name)

    def broken():
        raise RuntimeError("no kernel")

    fns = {"a": provider("a"), "b": provider("b"), "broken": broken}
    # A zero budget: one timed call per provider and round (after one warm-up in the first round), alternating.
    timings, errors = measure.time_interleaved(fns, "cpu", budget_s=0.0, min_reps=6, rounds=3)
    assert set(timings) == {"a", "b"} and isinstance(errors["broken"], RuntimeError)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 2
    for t in timings.values():
        assert t.reps == 3 == len(t.times) and t.min_s == min(t.times) and t.peak_extra_bytes is None


def test_backend_providers_list_every_backend():
    providers, skipped = registry.backend_providers("cpu", lambda b: lambda: b)
    assert set(providers) | set(skipped) == {"pyfuse:cpu", "pyfuse:cuda", "pyfuse:triton"}
    assert "pyfuse:triton" in skipped  # the interpreter is never benchmarked
    status = pyfuse.backends()["cpu"]
    assert ("pyfuse:cpu" in providers) == status.usable
    assert all(reason for reason in skipped.values())


def test_cli_bench(fake_family, tmp_path, capsys):
    path = tmp_path / "out.json"
    assert cli.main(["bench", "--quick", "--family", "fake", "--device", "cpu", "--json", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "fake/double[n=1000 float32]" in out and f"wrote {path}" in out
    # progress (stderr is no terminal): the case and its providers, timed in alternating rounds
    assert "[pyfuse bench] fake/double[n=1000 float32] (pyfuse:cpu, " in err
    assert json.loads(path.read_text())["results"]


def test_cli_bench_bad_arguments(fake_family, capsys):
    assert cli.main(["bench", "--family", "nope"]) == 2
    assert "unknown family 'nope'; known: failing, fake" in capsys.readouterr().err
    assert cli.main(["bench", "--device", "nodevice"]) == 2
    assert "bad --device 'nodevice'" in capsys.readouterr().err


def test_cli_plot(fake_family, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert cli.main(["bench", "--quick", "--family", "fake", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["bench", "--quick", "--family", "fake", "--plot", str(png)]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_cli_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name, status in pyfuse.backends().items():
        assert f"{name} " in out and status.reason in out
    for text in (f"torch {torch.__version__}", "numpy ", "python ", "pyfuse._C", "CPU: ", "output cache "):
        assert text in out, text

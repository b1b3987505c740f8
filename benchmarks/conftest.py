"""pytest-benchmark glue: the cases of `pyfuse bench` as benchmark tests.

A family's file is two lines, `from benchmarks.conftest import family_benchmark` and
`test_<op> = family_benchmark("<family>")`; the test is parametrized here over the family's cases x providers.
Run `pytest benchmarks/ --benchmark-only` (add `--pyfuse-quick` for the small shapes of `pyfuse bench --quick`).
Skipped providers skip with their reason.
"""

from __future__ import annotations

import pytest
import torch

from pyfuse._backend_error import BackendError
from pyfuse.bench.registry import BenchCase, discover, iter_cases
from pyfuse.bench.runner import default_device

_current: dict = {}  # the family's case being benchmarked, and the generator that made it


def pytest_addoption(parser):
    parser.addoption("--pyfuse-quick", action="store_true", help="benchmark the small shapes of pyfuse bench --quick")


def _case(family: str, name: str, quick: bool) -> BenchCase:
    """The case called `name`, generating the family's cases in order (one case alive at a time)."""
    if _current.get("case") is not None and _current["case"].name == name:
        return _current["case"]
    for restart in (False, True):
        if restart or _current.get("family") != family:
            _current.update(family=family, cases=iter_cases(default_device(), quick, family), case=None)
        for case in _current["cases"]:
            _current["case"] = case
            if case.name == name:
                return case
    raise LookupError(f"case {name!r} vanished from family {family!r}")


def family_benchmark(family: str):
    """A benchmark test over every case x provider of `family`, parametrized in `pytest_generate_tests`."""

    def test(benchmark, request, case_name, provider):
        case = _case(family, case_name, request.config.getoption("--pyfuse-quick"))
        if provider in case.skipped:
            pytest.skip(f"{provider}: {case.skipped[provider]}")
        fn, device = case.providers[provider], default_device()
        if device.type == "cuda":
            fn = lambda fn=fn: (fn(), torch.cuda.synchronize(device))  # noqa: E731
        benchmark.group = case.name
        benchmark.extra_info.update(bytes_floor=case.bytes_floor, peers=list(case.peers))
        try:
            benchmark(fn)
        except BackendError as e:  # the op has no kernel for this backend
            pytest.skip(f"{provider}: {e}")

    test.pyfuse_family = family
    return test


def pytest_generate_tests(metafunc):
    family = getattr(metafunc.function, "pyfuse_family", None)
    if family is None:
        return
    errors = discover()
    if errors:
        raise RuntimeError(f"case modules failed to import: {errors}")
    quick = metafunc.config.getoption("--pyfuse-quick")
    params = [
        pytest.param(case.name, provider, id=f"{case.op}:{case.params}:{provider}".replace(" ", "_"))
        for case in iter_cases(default_device(), quick, family)
        for provider in (*case.providers, *case.skipped)
    ]
    metafunc.parametrize("case_name,provider", params)

"""Chain verification under pytest-benchmark (cases: pyfuse/bench/cases_spec.py)."""

from benchmarks.conftest import family_benchmark

test_spec_chain = family_benchmark("spec")

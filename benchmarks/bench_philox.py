"""`pyfuse.rand` under pytest-benchmark (cases: pyfuse/bench/cases_philox.py)."""

from benchmarks.conftest import family_benchmark

test_rand = family_benchmark("philox")

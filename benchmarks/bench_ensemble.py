"""Union-vocabulary ops under pytest-benchmark (cases: pyfuse/bench/cases_ensemble.py)."""

from benchmarks.conftest import family_benchmark

test_ensemble = family_benchmark("ensemble")

"""`pyfuse.magnitude_prune` / `pyfuse.random_prune` under pytest-benchmark (cases: pyfuse/bench/cases_prune.py)."""

from benchmarks.conftest import family_benchmark

test_prune = family_benchmark("prune")

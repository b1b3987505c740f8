"""`pyfuse.merge_tensors` under pytest-benchmark (cases: pyfuse/bench/cases_merge.py)."""

from benchmarks.conftest import family_benchmark

test_merge_tensors = family_benchmark("merge")

"""Tree verification under pytest-benchmark (cases: pyfuse/bench/cases_spec_tree.py)."""

from benchmarks.conftest import family_benchmark

test_verify_tree = family_benchmark("spec_tree")

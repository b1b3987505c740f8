"""pytest-benchmark suites (a package, so that `benchmarks.conftest` never clashes with `tests/conftest.py`)."""

"""`pyfuse bench`: times every registered op for each provider (reference, pyfuse backends, installed peers).

Case modules register with `pyfuse.bench.registry.register_cases`; `pyfuse.bench.runner.run` executes them.
"""

from pyfuse.bench.registry import BenchCase, register_cases

__all__ = ["BenchCase", "register_cases"]

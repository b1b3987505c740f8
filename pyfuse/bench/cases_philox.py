"""Benchmark cases for `pyfuse.rand` (Philox4x32-10 uniforms).

Peers draw the same number of float32 uniforms with their own generators: `torch.rand` (torch's default
generator), numpy's Philox bit generator on CPU, and `torch.compile` of the plain-torch reference.
"""

from __future__ import annotations

import functools

import torch

import pyfuse
from pyfuse.bench.registry import BenchCase, backend_providers, register_cases
from pyfuse.reference import philox as ref

SEED = 1234


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(ref.rand, fullgraph=True, dynamic=False)


@register_cases("philox")
def cases(device, quick):
    sizes = (1 << 16,) if quick else (1 << 20, 1 << 24)
    for n in sizes:
        providers, skipped = backend_providers(
            device, lambda b, n=n: lambda: pyfuse.rand(n, seed=SEED, device=device, backend=b))
        providers["reference"] = lambda n=n: ref.rand(n, SEED, device=device)
        providers["torch.rand"] = lambda n=n: torch.rand(n, device=device)
        peers = ["torch.rand"]
        if quick:
            skipped["torch.compile"] = "compile time does not fit --quick"
        else:
            providers["torch.compile"] = lambda n=n: _compiled_reference()(n, SEED, device=device)
            peers.append("torch.compile")
        if device.type == "cpu":
            import numpy as np

            gen = np.random.Generator(np.random.Philox(SEED))
            providers["numpy.Philox"] = lambda n=n: gen.random(n, dtype=np.float32)
            peers.append("numpy.Philox")
        yield BenchCase(
            family="philox", op="rand", params=f"n={n} float32", bytes_floor=4 * n,
            providers=providers, peers=tuple(peers), skipped=skipped,
        )

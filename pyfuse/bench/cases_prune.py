"""Benchmark cases for `pyfuse.magnitude_prune` and `pyfuse.random_prune`.

Peers: PEFT's `magnitude_based_pruning` / `random_pruning` (peft.utils.merge_utils) and plain-torch
`torch.topk` masking (what PEFT does, minus the float mask). Default shape 4096x4096 at density 0.2, in
float32 and bfloat16.
"""

from __future__ import annotations

import torch

import pyfuse
from pyfuse.bench.registry import BenchCase, backend_providers, register_cases
from pyfuse.reference import prune as ref

DENSITY = 0.2
SEED = 1234


def _topk_prune(x, density):
    flat = x.reshape(-1)
    idx = torch.topk(flat.abs(), int(density * flat.numel()), sorted=False).indices
    return torch.zeros_like(flat).index_copy_(0, idx, flat[idx]).reshape(x.shape)


def _peft():
    try:
        from peft.utils import merge_utils
    except ImportError as err:
        return None, f"peft not installed ({err})"
    return merge_utils, None


@register_cases("prune")
def cases(device, quick):
    shape = (1024, 1024) if quick else (4096, 4096)
    merge_utils, peft_missing = _peft()
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(shape, generator=gen).to(dtype).to(device)
        n, size = x.numel(), x.element_size()
        params = f"{shape[0]}x{shape[1]} {str(dtype).replace('torch.', '')} density={DENSITY}"

        providers, skipped = backend_providers(
            device, lambda b, x=x: lambda: pyfuse.magnitude_prune(x, DENSITY, backend=b))
        providers["reference"] = lambda x=x: ref.magnitude_prune(x, DENSITY)
        providers["torch.topk"] = lambda x=x: _topk_prune(x, DENSITY)
        if merge_utils is None:
            skipped["peft"] = peft_missing
        else:
            providers["peft"] = lambda x=x: merge_utils.magnitude_based_pruning(x, DENSITY)
        yield BenchCase(family="prune", op="magnitude_prune", params=params, bytes_floor=2 * n * size,
                        providers=providers, peers=("peft", "torch.topk"), skipped=skipped)

        providers, skipped = backend_providers(
            device, lambda b, x=x: lambda: pyfuse.random_prune(x, DENSITY, seed=SEED, backend=b))
        if quick:
            providers["reference"] = lambda x=x: ref.random_prune(x, DENSITY, SEED)
        else:  # int64-emulated Philox in plain torch: seconds per call at this size
            skipped["reference"] = "plain-torch Philox specification, timed with --quick only"
        if merge_utils is None:
            skipped["peft"] = peft_missing
        else:
            providers["peft"] = lambda x=x: merge_utils.random_pruning(x, DENSITY, rescale=True)
        yield BenchCase(family="prune", op="random_prune", params=params, bytes_floor=2 * n * size,
                        providers=providers, peers=("peft",), skipped=skipped)

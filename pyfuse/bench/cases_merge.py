"""Benchmark cases for `pyfuse.merge_tensors` (op `pyfuse::merge_task_vectors`).

K = 3 fine-tuned tensors and a base, density 0.2, methods task_arithmetic / ties / dare_ties / della with
mergekit 0.1.5's semantics. Peers: mergekit's own `GeneralizedTaskArithmeticMerge` (through its registry,
called as mergekit calls it), PEFT's `merge_utils` functions on the stacked deltas (as `add_weighted_adapter`
does, plus the base), plain torch eager (task arithmetic), and the plain-torch reference.
"""

from __future__ import annotations

import torch

from pyfuse.bench.registry import BenchCase, backend_providers, register_cases
from pyfuse.merge import merge_tensors

K, DENSITY, SEED = 3, 0.2, 1234
WEIGHTS = [1.0, 0.7, 0.4]

# method -> merge_tensors knobs equal to mergekit 0.1.5's defaults for it.
METHODS = {
    "task_arithmetic": dict(),
    "ties": dict(sparsify="magnitude", density=DENSITY, consensus="sum", normalize="agree_weight", k_min_one=True),
    "dare_ties": dict(sparsify="random", density=DENSITY, rescale="l1", consensus="sum", seed=SEED),
    "della": dict(sparsify="della", density=DENSITY, epsilon=0.15, rescale="l1", consensus="sum",
                  normalize="agree_weight", seed=SEED),
}


def _mergekit(method, base, models):
    try:
        from mergekit.merge_methods import registry
        from mergekit.merge_methods.base import TensorGroup
    except ImportError as e:
        return None, f"mergekit not installed ({e})"
    fn = registry.get(method)
    params = {"weight": WEIGHTS} if method == "task_arithmetic" else {"weight": WEIGHTS, "density": DENSITY}

    def run():
        return fn([TensorGroup.from_tensors([base, *models], base_index=0)], parameters=params)[0]

    return run, None


def _peft(method, base, models):
    try:
        from peft.utils import merge_utils
    except ImportError as e:
        return None, f"peft not installed ({e})"
    if method == "della":
        return None, "PEFT has no DELLA"
    weights = torch.tensor(WEIGHTS, device=base.device)

    def run():
        deltas = [m - base for m in models]
        if method == "task_arithmetic":
            return base + merge_utils.task_arithmetic(deltas, weights)
        if method == "ties":
            return base + merge_utils.ties(deltas, weights, DENSITY, "total")
        return base + merge_utils.dare_ties(deltas, weights, DENSITY, "total")

    return run, None


@register_cases("merge")
def cases(device, quick):
    shapes = [(512, 512)] if quick else [(4096, 4096), (14336, 4096)]
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            base = torch.randn(shape, generator=g).to(device, dtype)
            models = [(base.float() + 0.01 * torch.randn(shape, generator=g).to(device)).to(dtype) for _ in range(K)]
            for method, knobs in METHODS.items():
                providers, skipped = backend_providers(
                    device, lambda b, kn=knobs: lambda: merge_tensors(base, models, WEIGHTS, backend=b, **kn))
                if quick:
                    providers["reference"] = lambda kn=knobs: merge_tensors(base, models, WEIGHTS,
                                                                            backend="reference", **kn)
                else:
                    skipped["reference"] = "the torch reference (Philox in int64 ops, argsorts) is too slow here"
                peers = []
                for name, make in (("mergekit", _mergekit), ("peft", _peft)):
                    fn, why = make(method, base, models)
                    if fn is None:
                        skipped[name] = why
                    else:
                        providers[name] = fn
                        peers.append(name)
                if method == "task_arithmetic":
                    providers["torch.eager"] = lambda: base + sum(w * (m - base) for w, m in zip(WEIGHTS, models))
                    peers.append("torch.eager")
                yield BenchCase(
                    family="merge", op=method,
                    params=f"{shape[0]}x{shape[1]} {str(dtype).replace('torch.', '')} K={K} density={DENSITY}",
                    bytes_floor=(K + 2) * base.numel() * base.element_size(),
                    providers=providers, peers=tuple(peers), skipped=skipped,
                )

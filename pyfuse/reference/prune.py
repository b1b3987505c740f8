"""Reference (specification) for ``pyfuse.magnitude_prune`` and ``pyfuse.random_prune``.

magnitude_prune keeps exactly ``k = floor(density * numel)`` entries: those of largest |x|, ordered by
the |x| key below; among entries whose key equals the k-th largest, the lowest flat (row-major) indices
win. The key is the bit pattern of |x| (sign bit cleared), which orders like |x| and puts NaN above
+inf, so NaN counts as the largest magnitude. Pruned entries are +0.

random_prune keeps entry i iff ``u_i < density`` (density rounded to float32 once), where u_i is the
Philox uniform of counter (i, stream 0, purpose RANDOM_PRUNE_PURPOSE); kept entries are divided by the
float32 density in fp32 when ``rescale`` (at density 0 nothing is kept, so nothing is divided).
"""
from __future__ import annotations

import numpy as np
import torch

from .philox import rand_torch

# Philox purpose word (counter c3) of random_prune: ASCII "PRUN". Other random ops use other purposes,
# so the same seed gives them independent streams.
RANDOM_PRUNE_PURPOSE = 0x5052554E


def keep_count(density: float, numel: int) -> int:
    """k = floor(density * numel), computed once in double precision (as PEFT's int(density * numel))."""
    return int(density * numel)


def density_f32(density: float) -> float:
    """The density rounded to float32 (exact as a Python float), as every backend compares it."""
    return float(np.float32(density))


def magnitude_key(x: torch.Tensor) -> torch.Tensor:
    """int64 key of |x| per element: float32 bits & 0x7fffffff, or 16-bit pattern & 0x7fff."""
    if x.dtype == torch.float32:
        return x.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    return x.view(torch.int16).to(torch.int64) & 0x7FFF


def magnitude_prune(x: torch.Tensor, density: float) -> torch.Tensor:
    return magnitude_prune_topk(x, keep_count(density, x.numel()))


def magnitude_prune_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """magnitude_prune with the kept count k given directly (0 <= k <= numel)."""
    flat = x.reshape(-1)
    # A stable descending sort lists equal keys by ascending index: the lowest-index tie rule.
    order = torch.sort(magnitude_key(flat), descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=x.device)
    keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(x.shape)


def random_prune_uniforms(numel: int, seed: int, device=None) -> torch.Tensor:
    """u_i for i in [0, numel): the uniforms random_prune compares with the density."""
    index = torch.arange(numel, dtype=torch.int64, device=device)
    return rand_torch(seed, index, 0, RANDOM_PRUNE_PURPOSE)


def random_prune(x: torch.Tensor, density: float, seed: int, rescale: bool = True) -> torch.Tensor:
    flat = x.reshape(-1)
    d = density_f32(density)
    keep = random_prune_uniforms(flat.numel(), seed, x.device) < d
    values = flat.float() / d if rescale and d > 0 else flat.float()
    return torch.where(keep, values, torch.zeros_like(values)).to(x.dtype).reshape(x.shape)

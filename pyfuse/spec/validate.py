"""Argument checks shared by the speculative-decoding ops (chain and tree verification).

Shape/dtype checks raise at once. Checks that read tensor data (ids in the vocabulary, probability rows,
``cu_num_draft_tokens`` consistency) are collected in a ``ValueChecks`` and evaluated together with a single
host sync; public functions skip them with ``validate=False`` (hot loops), in which case the kernels still
only ever emit ids in ``[0, V)``. Large CPU probability / logit tensors are checked in one pass by the
extension (``_row_check``), which also names the offending row.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from .._backend_error import BackendError
from .._ext import cpu_ext, dtype_code
from .._validate import check_float_tensor, check_seed, check_tensor

ID_DTYPES = (torch.int32, torch.int64)

# |sum(row) - 1| allowed for probability rows, by dtype (fp16/bf16 rows carry their rounding error).
PROB_SUM_ATOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2}


class ValueChecks:
    """Data-dependent checks, evaluated together: one host sync for all of them."""

    def __init__(self):
        self._items = []

    def add(self, value, ok, message: str):
        """``ok(float) -> bool`` judges ``value`` (0-d tensor or number); ``message`` may contain ``{}``."""
        self._items.append((value, ok, message))

    def run(self):
        tensors = [v for v, _, _ in self._items if isinstance(v, torch.Tensor)]
        if tensors and tensors[0].device.type != "cpu":  # one device sync for all of them
            fetched = iter(torch.stack([v.to(torch.float64) for v in tensors]).tolist())
        else:
            fetched = iter([v.item() for v in tensors])
        for value, ok, message in self._items:
            number = next(fetched) if isinstance(value, torch.Tensor) else value
            if not ok(number):
                raise ValueError(message.format(number))


@dataclasses.dataclass(frozen=True)
class ChainLayout:
    batch: int  # B
    vocab: int  # V
    num_draft: int  # padded: K; ragged: T
    width: int  # output columns: max_draft_len + 1
    ragged: bool


def check_ids_tensor(name: str, t, ndim) -> torch.Tensor:
    return check_tensor(name, t, dtypes=ID_DTYPES, ndim=ndim)


def check_max_draft_len(value, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"max_draft_len must be an int >= 0, got {value!r}")
    return int(value)


def chain_layout(draft_token_ids, target, target_name: str, cu_num_draft_tokens, max_draft_len) -> ChainLayout:
    """Checks the shapes of a chain batch (padded or ragged) and returns its sizes."""
    check_float_tensor(target_name, target)
    if cu_num_draft_tokens is None:
        check_ids_tensor("draft_token_ids", draft_token_ids, 2)
        batch, k = draft_token_ids.shape
        if target.dim() != 3 or tuple(target.shape[:2]) != (batch, k + 1):
            raise ValueError(f"{target_name} must have shape [B, K+1, V] = [{batch}, {k + 1}, V] for draft_token_ids "
                             f"of shape [B, K] = {list(draft_token_ids.shape)}; got {list(target.shape)}")
        if max_draft_len is not None and max_draft_len != k:
            raise ValueError(f"max_draft_len must be None or K = {k} in the padded layout, got {max_draft_len!r}")
        layout = ChainLayout(batch, target.shape[-1], k, k + 1, False)
    else:
        check_ids_tensor("cu_num_draft_tokens", cu_num_draft_tokens, 1)
        check_ids_tensor("draft_token_ids", draft_token_ids, 1)
        if cu_num_draft_tokens.numel() < 1:
            raise ValueError("cu_num_draft_tokens must have B + 1 >= 1 entries (leading 0)")
        batch, total = cu_num_draft_tokens.numel() - 1, draft_token_ids.numel()
        if target.dim() != 2 or target.shape[0] != total + batch:
            raise ValueError(f"{target_name} must have shape [T+B, V] = [{total + batch}, V] (T = {total} draft tokens, "
                             f"B = {batch} requests); got {list(target.shape)}")
        width = check_max_draft_len(max_draft_len, total) + 1
        layout = ChainLayout(batch, target.shape[-1], total, width, True)
    if not 1 <= layout.vocab < MAX_VOCAB:
        raise ValueError(f"{target_name} must have a vocabulary dimension 1 <= V < 2**23 (the fixed-point "
                         f"row sums of the kernels are exact only below it); got V = {layout.vocab}")
    return layout


def check_draft_rows(name: str, draft, layout: ChainLayout) -> torch.Tensor:
    check_float_tensor(name, draft)
    expected = (layout.num_draft, layout.vocab) if layout.ragged else (layout.batch, layout.num_draft, layout.vocab)
    if tuple(draft.shape) != expected:
        raise ValueError(f"{name} must have shape {list(expected)} (one row per draft token); got {list(draft.shape)}")
    return draft


def check_temperature(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float > 0, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return value


def check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float >= 0, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite float >= 0, got {value}")
    return value


def check_seed_arg(seed, batch: int, device):
    """Returns (seed int mod 2**64, None) for an int, (0, int64 tensor [B]) for per-request seeds, or a fresh
    seed from torch's default CPU generator for None."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64).item()), None
    if isinstance(seed, torch.Tensor):
        check_ids_tensor("seed", seed, 1)
        if seed.shape[0] != batch:
            raise ValueError(f"seed tensor must have shape [B] = [{batch}] (one seed per request); got {list(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"seed tensor must be on {device}, got {seed.device}")
        return 0, seed.to(torch.int64).contiguous()
    return check_seed("seed", seed), None


def check_uniforms(name: str, uniforms, target: torch.Tensor) -> torch.Tensor:
    check_tensor(name, uniforms, dtypes=(torch.float32,))
    expected = (2,) + tuple(target.shape[:-1])
    if tuple(uniforms.shape) != expected:
        raise ValueError(f"{name} must have shape {list(expected)} = (2, *target.shape[:-1]): [0] accept draws, "
                         f"[1] recovered/bonus draws; got {list(uniforms.shape)}")
    return uniforms


# ---- data-dependent checks (ValueChecks) ----------------------------------------------------------------

MAX_VOCAB = 1 << 23  # csrc/include/pyfuse/spec_chain.h: 2^40-scaled weights summed over V entries fit in int64


def ids_in_vocab(checks: ValueChecks, name: str, ids: torch.Tensor, vocab: int):
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    checks.add(lo, lambda v: v >= 0, f"{name} must be in [0, {vocab}); found {{:.0f}}")
    checks.add(hi, lambda v: v < vocab, f"{name} must be in [0, V = {vocab}); found {{:.0f}}")


# Tensors of at least this many elements are checked by the extension's one-pass row check (fp32 row sums
# in a fixed order, min, max): about 2x faster than the torch reductions below in memory traffic alone, and
# no intra-op thread wake-ups. Smaller ones stay on torch, where the call overhead of either is what counts.
ROW_CHECK_MIN_NUMEL = 1 << 15


def _row_check(t: torch.Tensor, logits: bool):
    """(worst, its row index tuple, min, its row index tuple) from the CPU extension, or None where it does
    not apply (device, size, layout, extension missing). See csrc/cpu/spec_validate.cpp."""
    if t.device.type != "cpu" or t.numel() < ROW_CHECK_MIN_NUMEL or t.dim() not in (2, 3) or t.stride(-1) != 1:
        return None
    try:
        ext = cpu_ext()
    except BackendError:
        return None
    n0, s0 = (1, 0) if t.dim() == 2 else (t.shape[0], t.stride(0))
    n1, s1 = t.shape[-2], t.stride(-2)
    worst, worst_row, lo, lo_row = ext.spec_check_rows(t.data_ptr(), dtype_code(t), n0, s0, n1, s1, t.shape[-1],
                                                       logits)

    def index(row):
        return (row,) if t.dim() == 2 else divmod(row, n1)

    return worst, index(worst_row), lo, index(lo_row)


def probs_rows(checks: ValueChecks, name: str, p: torch.Tensor):
    """Every row finite, non-negative and summing to 1 within PROB_SUM_ATOL."""
    if p.numel() == 0:
        return
    atol = PROB_SUM_ATOL[p.dtype]
    fused = _row_check(p, logits=False)
    if fused is None:
        worst = (p.sum(dim=-1, dtype=torch.float32) - 1).abs().max()  # NaN / inf anywhere propagate here
        lo, at_worst, at_lo = p.amin(), "", ""
    else:
        worst, worst_row, lo, lo_row = fused
        at_worst, at_lo = f" (row {list(worst_row)})", f" (row {list(lo_row)})"
    checks.add(worst, lambda v: v <= atol,
               f"{name}: every row must be finite and sum to 1 within {atol}; worst |sum - 1| = {{}}{at_worst}")
    checks.add(lo, lambda v: v >= 0, f"{name} must be non-negative; found {{}}{at_lo}")


def logits_rows(checks: ValueChecks, name: str, logits: torch.Tensor):
    """No NaN or +inf, and at least one finite logit per row (-inf masks are allowed)."""
    if logits.numel() == 0:
        return
    fused = _row_check(logits, logits=True)
    if fused is None:
        worst, where = logits.amax(dim=-1).float().abs().max(), ""  # NaN, +inf, all -inf rows: non-finite
    else:
        worst, where = fused[0], f" (row {list(fused[1])})"
    checks.add(worst, math.isfinite, f"{name}: rows must hold no NaN or +inf and at least one finite value{where}")


def cu_consistent(checks: ValueChecks, cu: torch.Tensor, total: int, max_draft_len: int):
    """cu_num_draft_tokens: leading 0, non-decreasing, last entry T, counts <= max_draft_len."""
    name = "cu_num_draft_tokens"
    checks.add(cu[0], lambda v: v == 0, f"{name}[0] must be 0, got {{:.0f}}")
    checks.add(cu[-1], lambda v: v == total, f"{name}[-1] must equal T = {total} draft tokens, got {{:.0f}}")
    if cu.numel() > 1:
        lo, hi = torch.aminmax(cu.diff())
        checks.add(lo, lambda v: v >= 0, f"{name} must be non-decreasing; found a step of {{:.0f}}")
        checks.add(hi, lambda v: v <= max_draft_len,
                   f"{name}: a request has {{:.0f}} draft tokens, more than max_draft_len = {max_draft_len}")


def uniforms_in_range(checks: ValueChecks, name: str, uniforms: torch.Tensor):
    if uniforms.numel() == 0:
        return
    lo, hi = torch.aminmax(uniforms)
    checks.add(lo, lambda v: v >= 0, f"{name} must be in [0, 1); found {{}}")
    checks.add(hi, lambda v: v < 1, f"{name} must be in [0, 1); found {{}}")

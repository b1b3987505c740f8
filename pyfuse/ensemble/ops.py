"""Batched union-vocabulary ensembling ops: ``union_probs``, ``union_topk``, ``next_token``.

Public functions validate, normalise the weights and pick the backend; the ``pyfuse::`` custom ops take
the map's device tables as tensors (see ``pyfuse.ensemble.maps``) and have fakes, so they run under
``torch.compile`` and never synchronise with the device. Semantics: ``pyfuse.reference.ensemble``.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .. import _validate as V
from .._backend import call_kernel, register_kernel, resolve_backend
from .._ext import cpu_ext, cuda_ext, dtype_code, new_output, stream_of
from .._library import library_op
from ..reference import ensemble as ref
from .maps import EnsembleTables, tables_for

__all__ = ["NextToken", "union_probs", "union_topk", "next_token", "MAX_TOPK"]

MAX_TOPK = 32  # candidates per model in union_topk: M * k <= 256 candidates live in registers on GPUs
MODES = ("prob", "logprob")
ABSENT = ("zero", "renormalize")


class NextToken(NamedTuple):
    union_ids: torch.Tensor  # int64 [B], -1 when no union id has positive probability
    model_ids: torch.Tensor  # int64 [B, M], from_union[m][union_id], -1 where model m lacks it
    prob: torch.Tensor  # float32 [B], the ensemble probability of union_ids


# ---- validation --------------------------------------------------------------------------------------

def _check_logits(logits, tables: EnsembleTables):
    if isinstance(logits, torch.Tensor) or not isinstance(logits, (list, tuple)):
        raise TypeError("logits must be a list or tuple of [B, V_m] tensors, one per model")
    M = tables.num_models
    if len(logits) != M:
        raise ValueError(f"logits must hold one tensor per model of the map ({M}), got {len(logits)}")
    out = []
    for m, x in enumerate(logits):
        V.check_float_tensor(f"logits[{m}]", x, ndim=2)
        width = tables.to_union[m].numel()
        if x.shape[1] != width:
            raise ValueError(f"logits[{m}] has {x.shape[1]} columns but the map gives model {m} {width} ids "
                             f"(to_union[{m}]); pad the map with -1 for padded vocabulary rows")
        if x.shape[0] != logits[0].shape[0]:
            raise ValueError(f"logits[{m}] has batch size {x.shape[0]}, logits[0] has {logits[0].shape[0]}")
        if x.dtype != logits[0].dtype:
            raise TypeError(f"logits[{m}] has dtype {x.dtype}, logits[0] has {logits[0].dtype}; cast them to one")
        out.append(x if x.stride(1) == 1 or x.shape[1] == 1 else x.contiguous())
    V.check_same_device(**{f"logits[{m}]": x for m, x in enumerate(out)})
    return out


def _check_weights(weights, B: int, M: int, device) -> torch.Tensor:
    """float32 [B, M] normalised to sum 1 per row."""
    if weights is None:  # 1 / M, as ones / their sum (M exactly) would give, in one step fewer
        return torch.ones(B, M, dtype=torch.float32, device=device) / M
    if not isinstance(weights, torch.Tensor):
        if not isinstance(weights, (list, tuple)) or not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) for v in weights):
            raise TypeError("weights must be None, a sequence of M numbers or a float tensor [M] or [B, M]")
        weights = torch.tensor([float(v) for v in weights], dtype=torch.float32)
    V.check_float_tensor("weights", weights, ndim=(1, 2))
    if weights.shape not in ((M,), (B, M)):
        raise ValueError(f"weights must have shape [{M}] or [{B}, {M}] (models, batch), got {tuple(weights.shape)}")
    # Value checks read the data: done where that costs no device sync (CPU tensors, which includes
    # weights given as numbers, before they move to the logits' device; eager mode).
    if weights.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("weights must be finite (got NaN or inf)")
        if bool((weights < 0).any()):
            raise ValueError("weights must be >= 0")
        if bool((weights.sum(dim=-1) <= 0).any()):
            raise ValueError("weights must have a positive sum (per row for [B, M] weights)")
    if weights.device != torch.device(device):
        weights = weights.to(device)
    w = weights.float().expand(B, M)
    return (w / w.sum(dim=1, keepdim=True)).contiguous()


def _pattern_coefficients(w: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """cpat [B, 2**M]: c(u) of each present-models bit pattern; 1 / (sum of w over the pattern, in model
    order) for renormalize, else 1."""
    B, M = w.shape
    if not renormalize:
        return torch.ones(B, 1 << M, dtype=torch.float32, device=w.device)
    pats = torch.arange(1 << M, device=w.device)
    total = torch.zeros(B, 1 << M, dtype=torch.float32, device=w.device)
    for m in range(M):
        total = total + w[:, m:m + 1] * ((pats >> m) & 1).to(torch.float32)
    return torch.where(total > 0, 1.0 / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))


def _check_temperature(temperature, M: int) -> list:
    values = [temperature] * M if isinstance(temperature, numbers.Real) else temperature
    if not isinstance(values, (list, tuple)) or len(values) != M:
        raise ValueError(f"temperature must be a positive float or a sequence of {M} (one per model)")
    inv = []
    for m, t in enumerate(values):
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature[{m}] must be a finite float > 0, got {t!r}")
        inv.append(1.0 / float(t))  # every backend rounds it to fp32 once
    return inv


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _prepare(logits, vmap, weights, temperature, mode, absent, backend):
    _check_choice("mode", mode, MODES)
    _check_choice("absent", absent, ABSENT)
    if isinstance(logits, (list, tuple)) and logits and isinstance(logits[0], torch.Tensor):
        device = logits[0].device
    else:
        device = torch.device("cpu")
    tables = tables_for(vmap, device)
    logits = _check_logits(logits, tables)
    B, M = logits[0].shape[0], tables.num_models
    w = _check_weights(weights, B, M, device)
    cpat = _pattern_coefficients(w, absent == "renormalize")
    inv_temp = _check_temperature(temperature, M)
    name = resolve_backend(device, backend)
    args = (logits, tables.to_union, tables.rev_offsets, tables.rev_ids, tables.first_ids, tables.multi,
            tables.row_layout, tables.sparse, list(tables.max_mult), tables.present, w, cpat, inv_temp,
            mode == "logprob", absent == "renormalize")
    return args, tables, name


# ---- public functions --------------------------------------------------------------------------------

def union_probs(logits, vmap, weights=None, *, temperature=1.0, mode: str = "prob", absent: str = "zero",
                backend: str | None = None) -> torch.Tensor:
    """Ensemble distribution over the union vocabulary, float32 [B, U].

    logits: one [B, V_m] tensor per model (float32/float16/bfloat16, one dtype), V_m == len(to_union[m]);
    ids mapped to -1 are left out of the model's softmax. weights: None (equal), [M] or [B, M], >= 0,
    normalised to sum 1 per row. temperature: per model (or one float). mode "prob": weighted mean of the
    models' probabilities mapped to the union (model ids sharing a union id add up); "logprob": weighted
    geometric mean (product of experts), renormalised. absent "zero": a model lacking a union id gives it
    probability 0; "renormalize": that id's weights are renormalised over the models having it. The result
    is renormalised to sum 1 (up to fp32 rounding); exact definition in pyfuse.reference.ensemble.
    Extra memory: sum of V_m floats per thread, or per row when B < threads (CPU) / O(B * tiles) (GPU), plus
    the output.
    """
    args, tables, name = _prepare(logits, vmap, weights, temperature, mode, absent, backend)
    return torch.ops.pyfuse.union_probs(*args, name)


def union_topk(logits, vmap, k: int, weights=None, *, temperature=1.0, mode: str = "prob",
               absent: str = "zero", backend: str | None = None):
    """UniTE-style top-k ensemble, without touching the full union: ``(probs float32 [B, k], union_ids int64
    [B, k])``.

    Each model proposes its k highest-logit valid ids (ties: lower id); their union ids form the candidate
    set C (<= M*k ids). Every model's softmax mass on every candidate is gathered (also on candidates it did
    not propose; 0 when it lacks the id) and renormalised over C per model; these are combined as in
    ``union_probs`` (mode, absent, weights) and renormalised over C. The k best candidates come back sorted
    by probability (ties: lower union id); when C has fewer than k ids (ids of one model sharing a union
    id) the tail is padded with probability 0 and union id -1. 1 <= k <= min(MAX_TOPK, mapped ids per model).
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    args, tables, name = _prepare(logits, vmap, weights, temperature, mode, absent, backend)
    limit = min(MAX_TOPK, *tables.valid_counts)
    if not 1 <= k <= limit:
        raise ValueError(f"k must be in [1, {limit}] (MAX_TOPK={MAX_TOPK} and the fewest mapped ids of a model "
                         f"{min(tables.valid_counts)}), got {k}")
    return torch.ops.pyfuse.union_topk(*args, k, name)


def next_token(logits, vmap, weights=None, *, greedy: bool = True, seed: int | None = None, stream: int = 0,
               temperature=1.0, mode: str = "prob", absent: str = "zero", backend: str | None = None) -> NextToken:
    """Next union token of each row, without materialising [B, U]: ``NextToken(union_ids [B], model_ids
    [B, M], prob [B])``.

    greedy: the union id of highest ensemble probability (``union_probs`` semantics; ties: lowest union id).
    Otherwise a sample: Philox key ``seed``, counter (row, 0, ``stream``, SAMPLE_PURPOSE) gives a 31-bit s;
    the chosen id is the first whose fixed-point cumulative probability exceeds floor(Z * s / 2**31) —
    integer comparisons only, so every backend picks the same id. Pass the decoding step as ``stream`` for
    fresh draws each step. model_ids[b, m] = from_union[m][union_id] (-1 where model m has no single token).
    A row where no union id has positive probability gets union id -1 and prob 0.
    Extra memory (CPU): greedy with mode "prob", absent "zero" reads the logits only; the other cases hold one
    row's exponentials and scores (sum of V_m + U floats) per thread, or per row when B < threads.
    """
    if not isinstance(greedy, bool):
        raise TypeError(f"greedy must be a bool, got {type(greedy).__name__}")
    if greedy:
        seed = 0 if seed is None else V.check_seed("seed", seed)
    elif seed is None:
        raise ValueError("seed is required when greedy=False")
    else:
        seed = V.check_seed("seed", seed)
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < 1 << 32:
        raise ValueError(f"stream must be an int in [0, 2**32), got {stream!r}")
    args, tables, name = _prepare(logits, vmap, weights, temperature, mode, absent, backend)
    uid, mid, prob = torch.ops.pyfuse.next_token(*args, tables.from_union, greedy, V.to_i64(seed), stream, name)
    return NextToken(uid, mid, prob)


# ---- custom ops --------------------------------------------------------------------------------------

@library_op("union_probs")
def _union_probs_op(logits: list[torch.Tensor], to_union: list[torch.Tensor], rev_offsets: list[torch.Tensor],
                    rev_ids: list[torch.Tensor], first_ids: list[torch.Tensor], multi: list[torch.Tensor],
                    row_layout: list[torch.Tensor], sparse: list[torch.Tensor], max_mult: list[int],
                    present: torch.Tensor, weights: torch.Tensor, cpat: torch.Tensor, inv_temp: list[float],
                    logprob: bool, renormalize: bool, backend: str) -> torch.Tensor:
    a = _Args(logits, to_union, rev_offsets, rev_ids, first_ids, multi, row_layout, sparse, max_mult, present,
              weights, cpat, inv_temp, logprob, renormalize)
    if weights.shape[0] == 0:
        return weights.new_empty((0, present.shape[0]))
    return call_kernel("union_probs", backend, a)


@_union_probs_op.register_fake
def _(logits, to_union, rev_offsets, rev_ids, first_ids, multi, row_layout, sparse, max_mult, present, weights, cpat,
      inv_temp, logprob, renormalize, backend):
    return weights.new_empty((weights.shape[0], present.shape[0]))


@library_op("union_topk")
def _union_topk_op(logits: list[torch.Tensor], to_union: list[torch.Tensor], rev_offsets: list[torch.Tensor],
                   rev_ids: list[torch.Tensor], first_ids: list[torch.Tensor], multi: list[torch.Tensor],
                   row_layout: list[torch.Tensor], sparse: list[torch.Tensor], max_mult: list[int],
                   present: torch.Tensor, weights: torch.Tensor, cpat: torch.Tensor, inv_temp: list[float],
                   logprob: bool, renormalize: bool, k: int,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = _Args(logits, to_union, rev_offsets, rev_ids, first_ids, multi, row_layout, sparse, max_mult, present,
              weights, cpat, inv_temp, logprob, renormalize)
    if weights.shape[0] == 0:
        return weights.new_empty((0, k)), weights.new_empty((0, k), dtype=torch.int64)
    return call_kernel("union_topk", backend, a, k)


@_union_topk_op.register_fake
def _(logits, to_union, rev_offsets, rev_ids, first_ids, multi, row_layout, sparse, max_mult, present, weights, cpat,
      inv_temp, logprob, renormalize, k, backend):
    B = weights.shape[0]
    return weights.new_empty((B, k)), weights.new_empty((B, k), dtype=torch.int64)


@library_op("next_token")
def _next_token_op(logits: list[torch.Tensor], to_union: list[torch.Tensor], rev_offsets: list[torch.Tensor],
                   rev_ids: list[torch.Tensor], first_ids: list[torch.Tensor], multi: list[torch.Tensor],
                   row_layout: list[torch.Tensor], sparse: list[torch.Tensor], max_mult: list[int],
                   present: torch.Tensor, weights: torch.Tensor, cpat: torch.Tensor, inv_temp: list[float],
                   logprob: bool, renormalize: bool, from_union: list[torch.Tensor],
                   greedy: bool, seed: int, stream: int,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = _Args(logits, to_union, rev_offsets, rev_ids, first_ids, multi, row_layout, sparse, max_mult, present,
                 weights, cpat, inv_temp, logprob, renormalize)
    if weights.shape[0] == 0:
        M = weights.shape[1]
        return (weights.new_empty((0,), dtype=torch.int64), weights.new_empty((0, M), dtype=torch.int64),
                weights.new_empty((0,)))
    return call_kernel("next_token", backend, args, from_union, greedy, V.from_i64(seed), stream)


@_next_token_op.register_fake
def _(logits, to_union, rev_offsets, rev_ids, first_ids, multi, row_layout, sparse, max_mult, present, weights, cpat,
      inv_temp, logprob, renormalize, from_union, greedy, seed, stream, backend):
    B, M = weights.shape
    return (weights.new_empty((B,), dtype=torch.int64), weights.new_empty((B, M), dtype=torch.int64),
            weights.new_empty((B,)))


class _Args(NamedTuple):
    """The op arguments every backend receives."""
    logits: list
    to_union: list
    rev_offsets: list
    rev_ids: list
    first_ids: list
    multi: list
    row_layout: list
    sparse: list
    max_mult: list
    present: torch.Tensor
    weights: torch.Tensor
    cpat: torch.Tensor
    inv_temp: list
    logprob: bool
    renormalize: bool

    @property
    def union_size(self) -> int:
        return self.present.shape[0]


# ---- reference backend -------------------------------------------------------------------------------

def _ref_args(a: _Args, from_union=None):
    tables = EnsembleTables(union_size=a.union_size, to_union=a.to_union, rev_offsets=a.rev_offsets,
                            rev_ids=a.rev_ids, from_union=from_union or [], present=a.present,
                            first_ids=a.first_ids, multi=a.multi, valid_counts=(), max_mult=())
    return a.logits, tables, a.weights, a.cpat, a.inv_temp, a.logprob, a.renormalize


@register_kernel("union_probs", "reference")
def _union_probs_reference(a: _Args):
    return ref.union_probs(*_ref_args(a))


@register_kernel("union_topk", "reference")
def _union_topk_reference(a: _Args, k: int):
    return ref.union_topk(*_ref_args(a), k)


@register_kernel("next_token", "reference")
def _next_token_reference(a: _Args, from_union, greedy, seed, stream):
    return ref.next_token(*_ref_args(a, from_union), greedy, seed, stream)


# ---- cpu / cuda backends: one argument block of raw pointers ------------------------------------------

def _native_args(ext, a: _Args, from_union=None):
    ptrs = lambda ts: [t.data_ptr() for t in ts]  # noqa: E731
    return ext.ensemble_args(
        ptrs(a.logits), [x.stride(0) for x in a.logits], [x.shape[1] for x in a.logits], ptrs(a.to_union),
        ptrs(a.rev_offsets), ptrs(a.rev_ids), ptrs(a.first_ids), ptrs(a.multi), [t.shape[0] for t in a.multi],
        a.max_mult,
        ptrs(from_union or []), ptrs(a.row_layout), ptrs(a.sparse), [t.shape[0] for t in a.sparse],
        list(a.inv_temp), a.present.data_ptr(), a.weights.data_ptr(), a.cpat.data_ptr(),
        dtype_code(a.logits[0]), a.weights.shape[0], a.union_size, a.logprob, a.renormalize)


def _outputs(a: _Args, *shapes_dtypes):
    return [new_output(s, d, a.weights.device) for s, d in shapes_dtypes]


@register_kernel("union_probs", "cpu")
def _union_probs_cpu(a: _Args):
    (out,) = _outputs(a, ((a.weights.shape[0], a.union_size), torch.float32))
    cpu_ext().union_probs(_native_args(cpu_ext(), a), out.data_ptr())
    return out


@register_kernel("union_topk", "cpu")
def _union_topk_cpu(a: _Args, k: int):
    B = a.weights.shape[0]
    probs, ids = _outputs(a, ((B, k), torch.float32), ((B, k), torch.int64))
    cpu_ext().union_topk(_native_args(cpu_ext(), a), k, probs.data_ptr(), ids.data_ptr())
    return probs, ids


@register_kernel("next_token", "cpu")
def _next_token_cpu(a: _Args, from_union, greedy, seed, stream):
    B, M = a.weights.shape
    uid, mid, prob = _outputs(a, ((B,), torch.int64), ((B, M), torch.int64), ((B,), torch.float32))
    cpu_ext().next_token(_native_args(cpu_ext(), a, from_union), greedy, seed, stream, uid.data_ptr(),
                         mid.data_ptr(), prob.data_ptr())
    return uid, mid, prob


# ---- GPU backends (triton, cuda): tiled kernels, cross-tile steps in torch --------------------------------
#
# Kernels: model statistics per (row, model); a union pass per (row, tile of union ids) that stores keys,
# or reduces a tile to (max key, lowest id) or to a fixed-point score sum; a pick kernel that scans one tile
# per row for the sampled id. Max, lowest-id and integer sums are exact, so the result never depends on the
# tiling. Extra memory: O(B * U / tile).

MODE_WRITE, MODE_MAX, MODE_SUM = 0, 1, 2


class _TritonEngine:
    tile = 1024  # union ids per program
    vblock = 1024  # model ids per step of a row loop

    def __init__(self, a: _Args):
        from ..kernels import ensemble as kernels

        self.k, self.a = kernels, a
        dev = a.weights.device
        table = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=dev)  # noqa: E731
        self.logit_ptrs, self.fwd_ptrs = table(a.logits), table(a.to_union)
        self.off_ptrs, self.ids_ptrs = table(a.rev_offsets), table(a.rev_ids)
        self.stride = torch.tensor([x.stride(0) for x in a.logits], dtype=torch.int64, device=dev)
        self.vocab = torch.tensor([x.shape[1] for x in a.logits], dtype=torch.int64, device=dev)
        self.inv_temp = torch.tensor(a.inv_temp, dtype=torch.float32, device=dev)
        self.flags = dict(LOGPROB=a.logprob, RENORM=a.renormalize, enable_fp_fusion=False)

    def _union(self, mx, inv_s):
        a = self.a
        return (self.logit_ptrs, a.logits[0], self.off_ptrs, self.ids_ptrs, self.stride, self.inv_temp, mx, inv_s,
                a.present, a.weights, a.cpat)

    def stats(self, mx, total):
        B, M = self.a.weights.shape
        self.k.model_stats_kernel[(B, M)](self.logit_ptrs, self.a.logits[0], self.fwd_ptrs, self.vocab, self.stride,
                                          self.inv_temp, mx, total, M, BLOCK=self.vblock, enable_fp_fusion=False)

    def union_pass(self, mode, mx, inv_s, kmax, out, tile_val, tile_idx):
        B, M = self.a.weights.shape
        n = tile_idx.shape[1] if tile_idx is not None else -(-self.a.union_size // self.tile)
        self.k.union_pass_kernel[(B, n)](*self._union(mx, inv_s), kmax, out, tile_val, tile_idx, self.a.union_size,
                                         M, n, MODE=mode, BLOCK=self.tile, **self.flags)

    def pick(self, mx, inv_s, kmax, tile, base, target, chosen, score):
        B, M = self.a.weights.shape
        self.k.pick_kernel[(B,)](*self._union(mx, inv_s), kmax, tile, base, target, chosen, score,
                                 self.a.union_size, M, BLOCK=self.tile, **self.flags)

    def scores(self, out, kmax, tile_sum):
        B, n = tile_sum.shape
        self.k.scores_kernel[(B, n)](out, kmax, tile_sum, self.a.union_size, n, LOGPROB=self.a.logprob,
                                     BLOCK=self.tile, enable_fp_fusion=False)

    def scale(self, out, inv_z):
        B, U = out.shape
        self.k.scale_kernel[(B, -(-U // self.tile))](out, inv_z, U, BLOCK=self.tile, enable_fp_fusion=False)

    def topk(self, k, probs, ids):
        a = self.a
        B, M = a.weights.shape
        self.k.topk_kernel[(B,)](self.logit_ptrs, a.logits[0], self.fwd_ptrs, self.off_ptrs, self.ids_ptrs, self.vocab,
                                 self.stride, self.inv_temp, a.present, a.weights, a.cpat, probs, ids, M, k,
                                 BLOCK=self.vblock, C=max(16, 1 << (M * k - 1).bit_length()), **self.flags)


class _CudaEngine:
    def __init__(self, a: _Args):
        if a.weights.shape[0] > 65535:
            raise ValueError(f"the cuda backend takes at most 65535 rows, got {a.weights.shape[0]}")
        self.ext = cuda_ext()
        self.tile = self.ext.ensemble_tile
        self.args = _native_args(self.ext, a)
        self.stream = stream_of(a.weights)

    def stats(self, mx, total):
        self.ext.model_stats(self.args, mx.data_ptr(), total.data_ptr(), self.stream)

    def union_pass(self, mode, mx, inv_s, kmax, out, tile_val, tile_idx):
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        self.ext.union_pass(self.args, mode, mx.data_ptr(), inv_s.data_ptr(), ptr(kmax), ptr(out), ptr(tile_val),
                            ptr(tile_idx), self.stream)

    def pick(self, *tensors):
        self.ext.pick(self.args, *[t.data_ptr() for t in tensors], self.stream)

    def scores(self, out, kmax, tile_sum):
        self.ext.scores(self.args, out.data_ptr(), kmax.data_ptr(), tile_sum.data_ptr(), self.stream)

    def scale(self, out, inv_z):
        self.ext.scale(self.args, out.data_ptr(), inv_z.data_ptr(), self.stream)

    def topk(self, k, probs, ids):
        self.ext.union_topk(self.args, k, probs.data_ptr(), ids.data_ptr(), self.stream)


_ENGINES = {"triton": _TritonEngine, "cuda": _CudaEngine}


def _stats(eng, a: _Args):
    B, M = a.weights.shape
    mx = torch.empty(B, M, dtype=torch.float32, device=a.weights.device)
    total = torch.empty(B, M, dtype=torch.int64, device=a.weights.device)
    eng.stats(mx, total)
    return mx, ref.unfix_recip(total)


def _tiled_union_probs(backend: str, a: _Args):
    eng = _ENGINES[backend](a)
    mx, inv_s = _stats(eng, a)
    B, U = a.weights.shape[0], a.union_size
    out = torch.empty(B, U, dtype=torch.float32, device=a.weights.device)
    eng.union_pass(MODE_WRITE, mx, inv_s, mx, out, None, None)
    if a.logprob or a.renormalize:  # mode "prob" + absent "zero" already sums to 1
        kmax = out.amax(dim=1) if a.logprob else out[:, 0].contiguous()
        tile_sum = torch.empty(B, -(-U // eng.tile), dtype=torch.int64, device=out.device)
        eng.scores(out, kmax, tile_sum)
        eng.scale(out, ref.unfix_recip(tile_sum.sum(dim=1)))
    return out


def _tiled_next_token(backend: str, a: _Args, from_union, greedy, seed, stream):
    eng = _ENGINES[backend](a)
    mx, inv_s = _stats(eng, a)
    B, U = a.weights.shape[0], a.union_size
    dev = a.weights.device
    tiles = -(-U // eng.tile)
    normalize = a.logprob or a.renormalize
    kmax = torch.zeros(B, dtype=torch.float32, device=dev)
    if greedy or a.logprob:
        tile_val = torch.empty(B, tiles, dtype=torch.float32, device=dev)
        tile_idx = torch.empty(B, tiles, dtype=torch.int64, device=dev)
        eng.union_pass(MODE_MAX, mx, inv_s, kmax, None, tile_val, tile_idx)
        kmax = tile_val.amax(dim=1)
        best = torch.where(tile_val == kmax[:, None], tile_idx, U).amin(dim=1)  # lowest id wins ties
    inv_z = torch.ones(B, dtype=torch.float32, device=dev)
    if normalize or not greedy:
        tile_sum = torch.empty(B, tiles, dtype=torch.int64, device=dev)
        eng.union_pass(MODE_SUM, mx, inv_s, kmax, None, None, tile_sum)
        total = tile_sum.sum(dim=1)
        if normalize:
            inv_z = ref.unfix_recip(total)
    if greedy:
        none = kmax <= (float("-inf") if a.logprob else 0.0)
        uid = torch.where(none, -1, best)
        prob = torch.where(none, 0.0, (torch.ones_like(kmax) if a.logprob else kmax) * inv_z)
    else:
        target = ref.sample_target(total, seed, stream)
        cum = torch.cumsum(tile_sum, dim=1)
        tile = (cum <= target[:, None]).sum(dim=1).clamp(max=tiles - 1)
        base = torch.gather(cum - tile_sum, 1, tile[:, None])[:, 0].contiguous()
        tile = torch.where(total > 0, tile, -1)
        uid = torch.full((B,), -1, dtype=torch.int64, device=dev)
        score = torch.zeros(B, dtype=torch.float32, device=dev)
        eng.pick(mx, inv_s, kmax, tile, base, target, uid, score)
        prob = score * inv_z
    safe = uid.clamp(min=0)
    model_ids = torch.stack([torch.where(uid >= 0, f.to(torch.int64)[safe], -1) for f in from_union], dim=1)
    return uid, model_ids, prob


def _tiled_union_topk(backend: str, a: _Args, k: int):
    B = a.weights.shape[0]
    probs = torch.empty(B, k, dtype=torch.float32, device=a.weights.device)
    ids = torch.empty(B, k, dtype=torch.int64, device=a.weights.device)
    _ENGINES[backend](a).topk(k, probs, ids)
    return probs, ids


for _name in _ENGINES:
    register_kernel("union_probs", _name)(lambda a, _b=_name: _tiled_union_probs(_b, a))
    register_kernel("next_token", _name)(lambda a, *rest, _b=_name: _tiled_next_token(_b, a, *rest))
    register_kernel("union_topk", _name)(lambda a, k, _b=_name: _tiled_union_topk(_b, a, k))

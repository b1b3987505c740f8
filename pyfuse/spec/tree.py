"""``pyfuse.spec.verify_tree``: verification of tree drafts (SGLang/EAGLE first-child / next-sibling layout)
in three modes, on every backend. The semantics are stated in ``pyfuse.reference.spec_tree``."""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch

from .. import _validate as V
from .._backend import call_kernel, register_kernel, resolve_backend
from .._ext import cpu_ext, cuda_ext, dtype_code, stream_of
from .._library import library_op
from ..reference import spec_tree as ref
from ..reference.philox import MASK32, philox_torch, uint_to_uniform_torch
from . import validate as SV

MODES = ref.MODES
# Philox purpose words; must match csrc/include/pyfuse/spec_tree.h and kernels/spec_tree.py.
PURPOSE_ACCEPT, PURPOSE_FINAL = 0x74726561, 0x74726566


class TreeOutput(NamedTuple):
    """Result of ``verify_tree`` (all int32, fixed shapes, W = max_depth + 1).

    accept_index ``[B, W]``: node indices of the accepted path, starting with the root 0, then -1.
    accept_len ``[B]``: accepted draft tokens (the path has accept_len + 1 nodes).
    token_ids ``[B, W]``: the accept_len accepted draft tokens, then the correction/bonus token, then -1.
    bonus ``[B]``: the correction/bonus token (= token_ids[b, accept_len[b]]), always in [0, V).
    """

    accept_index: torch.Tensor
    accept_len: torch.Tensor
    token_ids: torch.Tensor
    bonus: torch.Tensor


def verify_tree(candidates, retrive_next_token, retrive_next_sibling, target_probs, *, mode: str = "greedy",
                draft_probs=None, max_depth: int | None = None, seed=None, uniforms=None, validate: bool = True,
                backend: str | None = None) -> TreeOutput:
    """Verify a batch of draft trees against the target model.

    candidates ``[B, N]`` token ids (node 0 = root = last verified token); retrive_next_token ``[B, N]`` first
    child of each node, retrive_next_sibling ``[B, N]`` next sibling (-1 = none), int32/int64.
    target_probs ``[B, N, V]``: row i is the target distribution of the token after node i (greedy mode only
    takes its argmax, so logits work too). draft_probs ``[B, N, V]`` (stochastic mode only): row i is the
    distribution the children of node i were drafted from, i.i.d. — the contract that makes the mode lossless.

    mode: ``greedy``, ``target_only`` (lossless for any draft; SGLang thresholds 1) or ``stochastic``
    (SpecInfer recursive rejection). max_depth (default N - 1) bounds the accepted path and sets the output
    width. seed: int (stream = row), int64 tensor ``[B]`` (per-request, batch-invariant) or None (fresh).
    uniforms: float32 ``[2, B, N]`` injected draws instead of Philox: ``[0, b, i]`` the coin at node i,
    ``[1, b, 0]`` the final draw. validate=False skips the checks that read tensor data (one host sync).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    SV.check_ids_tensor("candidates", candidates, 2)
    batch, n = candidates.shape
    for name, t in (("retrive_next_token", retrive_next_token), ("retrive_next_sibling", retrive_next_sibling)):
        SV.check_ids_tensor(name, t, 2)
        if tuple(t.shape) != (batch, n):
            raise ValueError(f"{name} must have the shape of candidates [B, N] = {[batch, n]}; got {list(t.shape)}")
    V.check_float_tensor("target_probs", target_probs, ndim=3)
    if tuple(target_probs.shape[:2]) != (batch, n) or target_probs.shape[2] < 1:
        raise ValueError(f"target_probs must have shape [B, N, V] = [{batch}, {n}, V >= 1]; "
                         f"got {list(target_probs.shape)}")
    if n < 1:
        raise ValueError("candidates must hold at least the root node (N >= 1)")
    vocab = target_probs.shape[2]
    if mode == "stochastic":
        if draft_probs is None:
            raise ValueError("mode 'stochastic' needs draft_probs [B, N, V]")
        V.check_float_tensor("draft_probs", draft_probs, ndim=3)
        if draft_probs.shape != target_probs.shape or draft_probs.dtype != target_probs.dtype:
            raise ValueError(f"draft_probs must match target_probs: shape {list(target_probs.shape)} dtype "
                             f"{target_probs.dtype}; got {list(draft_probs.shape)} {draft_probs.dtype}")
    elif draft_probs is not None:
        raise ValueError(f"draft_probs is only used by mode 'stochastic' (mode is {mode!r})")
    if max_depth is None:
        max_depth = n - 1
    if isinstance(max_depth, bool) or not isinstance(max_depth, numbers.Integral) or max_depth < 0:
        raise ValueError(f"max_depth must be an int >= 0, got {max_depth!r}")
    device = V.check_same_device(candidates=candidates, retrive_next_token=retrive_next_token,
                                 retrive_next_sibling=retrive_next_sibling, target_probs=target_probs,
                                 draft_probs=draft_probs)
    if uniforms is not None and seed is not None:
        raise ValueError("pass seed or uniforms, not both: injected uniforms replace the seeded draws")
    seed_int, seeds = (0, None) if uniforms is not None else SV.check_seed_arg(seed, batch, device)
    if uniforms is not None:
        V.check_tensor("uniforms", uniforms, dtypes=(torch.float32,))
        if tuple(uniforms.shape) != (2, batch, n):
            raise ValueError(f"uniforms must have shape [2, B, N] = {[2, batch, n]}: [0] coins per node, "
                             f"[1, :, 0] final draws; got {list(uniforms.shape)}")
        V.check_same_device(target_probs=target_probs, uniforms=uniforms)
    if validate:
        _check_values(candidates, retrive_next_token, retrive_next_sibling, target_probs, draft_probs, mode,
                      vocab, uniforms)
    name = resolve_backend(device, backend)
    row_streams = seeds is None
    if seeds is None:
        seeds = torch.full((batch,), V.to_i64(seed_int), dtype=torch.int64, device=device)
    out = torch.ops.pyfuse.verify_tree(candidates.to(torch.int64), retrive_next_token.to(torch.int64),
                                       retrive_next_sibling.to(torch.int64), target_probs, draft_probs,
                                       MODES.index(mode), int(max_depth), seeds, row_streams, uniforms, name)
    return TreeOutput(*out)


def _check_values(candidates, next_token, next_sibling, target, draft, mode, vocab, uniforms):
    """Ids in the vocabulary, a well-formed tree (pointers in {-1} U [1, N), at most one parent per node, the
    root without siblings: then no walk from the root can cycle) and valid probability rows; one host sync."""
    checks = SV.ValueChecks()
    batch, n = candidates.shape
    SV.ids_in_vocab(checks, "candidates", candidates, vocab)
    if batch:
        links = torch.cat([next_token, next_sibling], dim=1).to(torch.int64)
        lo, hi = torch.aminmax(links)
        checks.add(lo, lambda v: v >= -1, "retrive_next_token/retrive_next_sibling must be -1 or a node index; "
                                          "found {:.0f}")
        checks.add(hi, lambda v: v < n, f"retrive_next_token/retrive_next_sibling must be < N = {n}; found {{:.0f}}")
        checks.add((links == 0).sum(), lambda v: v == 0,
                   "retrive_next_token/retrive_next_sibling must not point at the root node 0 ({:.0f} links do)")
        checks.add(next_sibling[:, 0].to(torch.int64).max(), lambda v: v == -1,
                   "retrive_next_sibling[:, 0] must be -1: the root has no siblings (found {:.0f})")
        parents = torch.zeros(batch, n + 1, dtype=torch.int64, device=links.device)
        parents.scatter_add_(1, torch.where(links > 0, links, n).clamp(max=n), torch.ones_like(links))
        checks.add(parents[:, :n].max(), lambda v: v <= 1,
                   "the tree has a node reached by {:.0f} links (a cycle or a shared child): a node may be the "
                   "first child or the next sibling of at most one node")
    if mode == "greedy":  # greedy takes logits or probabilities: rows must be free of NaN and +inf
        SV.logits_rows(checks, "target_probs", target)
    else:
        SV.probs_rows(checks, "target_probs", target)
    if draft is not None:
        SV.probs_rows(checks, "draft_probs", draft)
    if uniforms is not None:
        SV.uniforms_in_range(checks, "uniforms", uniforms)
    checks.run()


@library_op("verify_tree")
def _verify_tree_op(candidates: torch.Tensor, next_token: torch.Tensor, next_sibling: torch.Tensor,
                    target: torch.Tensor, draft: Optional[torch.Tensor], mode: int, max_depth: int,
                    seeds: torch.Tensor, row_streams: bool, uniforms: Optional[torch.Tensor],
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return call_kernel("verify_tree", backend, candidates, next_token, next_sibling, target, draft, mode,
                       max_depth, seeds, row_streams, uniforms)


@_verify_tree_op.register_fake
def _(candidates, next_token, next_sibling, target, draft, mode, max_depth, seeds, row_streams, uniforms,
      backend):
    return _empty_outputs(candidates.shape[0], max_depth + 1, candidates.device)


def _empty_outputs(batch, width, device):
    return (torch.empty(batch, width, dtype=torch.int32, device=device),
            torch.empty(batch, dtype=torch.int32, device=device),
            torch.empty(batch, width, dtype=torch.int32, device=device),
            torch.empty(batch, dtype=torch.int32, device=device))


def philox_tree_uniforms(seeds: torch.Tensor, row_streams: bool, n: int) -> torch.Tensor:
    """float32 ``[2, B, N]``: [0, b, i] = Philox(seeds[b], index i, stream, accept), [1, b, 0] = the final
    draw (index 0, purpose final); stream = b when row_streams else 0."""
    batch = seeds.shape[0]
    key = seeds.to(torch.int64)[:, None]
    k0, k1 = key & MASK32, (key >> 32) & MASK32
    index = torch.arange(n, dtype=torch.int64, device=seeds.device).expand(batch, n)
    stream = (torch.arange(batch, dtype=torch.int64, device=seeds.device)[:, None] if row_streams
              else torch.zeros(batch, 1, dtype=torch.int64, device=seeds.device)).expand(batch, n)
    words = [philox_torch(index, torch.zeros_like(index), stream, torch.full_like(index, purpose), k0, k1)[0]
             for purpose in (PURPOSE_ACCEPT, PURPOSE_FINAL)]
    draws = [uint_to_uniform_torch(w) for w in words]
    return torch.stack(draws)


@register_kernel("verify_tree", "reference")
def _reference(candidates, next_token, next_sibling, target, draft, mode, max_depth, seeds, row_streams,
               uniforms):
    n = candidates.shape[1]
    if uniforms is None:
        uniforms = philox_tree_uniforms(seeds, row_streams, n)
    cpu = [t.cpu() if t is not None else None for t in (candidates, next_token, next_sibling, target, draft)]
    out = ref.verify_tree(*cpu, MODES[mode], max_depth, uniforms[0].cpu(), uniforms[1, :, 0].cpu())
    return tuple(t.to(candidates.device) for t in out)


def _kernel_args(candidates, next_token, next_sibling, target, draft, mode, max_depth, seeds, row_streams,
                 uniforms):
    """Pointer/size arguments shared by the cpu and cuda bindings, plus the tensors that own them."""
    batch, n, vocab = target.shape
    if target.stride(-1) != 1 or (draft is not None and draft.stride() != target.stride()):
        target = target.contiguous()
        draft = None if draft is None else draft.contiguous()
    tensors = [t.contiguous() for t in (candidates, next_token, next_sibling, seeds)]
    u = uniforms[0].contiguous() if uniforms is not None else None
    uf = uniforms[1, :, 0].contiguous() if uniforms is not None else None
    work = torch.empty(batch, n, dtype=torch.float64, device=target.device)
    outs = _empty_outputs(batch, max_depth + 1, target.device)
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    args = (*(ptr(t) for t in tensors[:3]), ptr(target), ptr(draft), dtype_code(target), batch, n, vocab,
            target.stride(0), target.stride(1), mode, max_depth, ptr(tensors[3]), int(row_streams), ptr(u),
            ptr(uf), ptr(work), *(ptr(t) for t in outs))
    keep = (tensors, target, draft, u, uf, work)
    return args, outs, keep


@register_kernel("verify_tree", "cpu")
def _cpu(*args):
    call, outs, _keep = _kernel_args(*args)
    if outs[0].shape[0]:
        cpu_ext().verify_tree(*call)
    return outs


@register_kernel("verify_tree", "cuda")
def _cuda(*args):
    call, outs, _keep = _kernel_args(*args)
    if outs[0].shape[0]:
        cuda_ext().verify_tree(*call, stream_of(outs[0]))
    return outs


@register_kernel("verify_tree", "triton")
def _triton(candidates, next_token, next_sibling, target, draft, mode, max_depth, seeds, row_streams, uniforms):
    from ..kernels import spec_tree as kernels

    batch, n, _ = target.shape
    outs = _empty_outputs(batch, max_depth + 1, target.device)
    if batch:
        kernels.verify_tree(candidates.contiguous(), next_token.contiguous(), next_sibling.contiguous(),
                            target, draft, mode, max_depth, seeds.contiguous(), row_streams, uniforms, outs)
    return outs

"""Chain verification of speculative drafts: ``verify_greedy``, ``rejection_sample``, ``typical_accept``.

Layouts (both fixed-shape, no host sync in the ops):

* padded: ``draft_token_ids [B, K]``, target ``[B, K+1, V]``, draft rows ``[B, K, V]``;
* ragged: ``draft_token_ids [T]``, ``cu_num_draft_tokens [B+1]`` (leading 0), target ``[T+B, V]`` (each
  request's rows followed by its bonus row), draft rows ``[T, V]``. The output has ``max_draft_len + 1``
  columns; ``max_draft_len`` defaults to ``T``, the only bound known without reading ``cu`` (pass the real
  maximum to get a narrower output).

Output: ``SpecOutput(token_ids [B, max_draft_len+1] int32 padded with -1, num_accepted [B] int32)``.

Randomness (``rejection_sample``): Philox4x32-10 with key = the request's seed and counter = (position in
the request, stream, purpose), purpose 1 = accept test, 2 = recovered token, 3 = bonus token. With
``seed=`` an int, stream = the request's batch index; with ``seed=`` a ``[B]`` int64 tensor, stream = 0, so
a request's output depends only on its own seed and rows (batch-invariant). Vary the seed between decoding
steps. ``uniforms=`` float32 ``(2, *target.shape[:-1])`` replaces the draws: ``[0]`` the accept uniforms at
each draft position (the bonus row's entry is unused), ``[1]`` the uniform that samples the token emitted at
that row (recovered at a rejection, bonus at the bonus row).

Sampling a recovered or bonus token: inverse CDF over fixed-point weights ``int64(clamp(w, 0, 1) * 2**40)``
with threshold ``int64(float64(u) * total)`` (see ``pyfuse.reference.spec``), identical on every backend for
probability inputs. Logit inputs are softmaxed in the kernel; exp/log are not bit-portable, so backends agree
with the reference up to float rounding of the probabilities.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _validate
from .._backend import call_kernel, register_kernel, resolve_backend
from .._library import library_op
from .._ext import cpu_ext, cuda_ext, dtype_code, stream_of
from ..reference import spec as ref
from . import validate as V
from .types import SpecOutput

GREEDY, REJECTION, TYPICAL = 0, 1, 2  # must match csrc/include/pyfuse/spec_chain.h (enum Mode)


# ---- public functions -----------------------------------------------------------------------------------

def verify_greedy(draft_token_ids, target_logits, *, cu_num_draft_tokens=None, max_draft_len=None,
                  validate: bool = True, backend: Optional[str] = None) -> SpecOutput:
    """Greedy verification: accept the longest prefix of drafts equal to the argmax of the target rows
    (lowest index wins ties), then emit the argmax at the first mismatch or at the bonus row.
    ``target_logits`` may be logits or probabilities (the argmax is the same)."""
    layout = V.chain_layout(draft_token_ids, target_logits, "target_logits", cu_num_draft_tokens, max_draft_len)
    device = _validate.check_same_device(draft_token_ids=draft_token_ids, target_logits=target_logits,
                                         cu_num_draft_tokens=cu_num_draft_tokens)
    if validate:
        checks = _common_checks(draft_token_ids, layout, cu_num_draft_tokens)
        V.logits_rows(checks, "target_logits", target_logits)
        checks.run()
    name = resolve_backend(device, backend)
    tokens, num = torch.ops.pyfuse.verify_greedy(draft_token_ids, target_logits, cu_num_draft_tokens,
                                                 layout.width - 1, name)
    return SpecOutput(tokens, num)


def rejection_sample(draft_token_ids, target_probs=None, draft_probs=None, *, target_logits=None,
                     draft_logits=None, temperature=None, cu_num_draft_tokens=None, max_draft_len=None,
                     seed=None, uniforms=None, validate: bool = True, backend: Optional[str] = None) -> SpecOutput:
    """Lossless speculative sampling (Leviathan et al. / Chen et al.): accept draft x with probability
    min(1, p(x)/q(x)) (tested as ``u * q < p``), on the first rejection emit a token from normalised
    max(0, p - q), and a bonus token from p when every draft is accepted.

    Target: ``target_probs`` or ``target_logits``; draft: ``draft_probs``, ``draft_logits`` or neither (the
    draft is one-hot: q(x) = 1, acceptance is p(x)). Logits become softmax(logits / temperature) inside the
    kernel (``temperature`` default 1, logits only). q must be the distribution the draft tokens were
    actually sampled from. ``seed``: int, ``[B]`` int64 tensor (per request), or None (a fresh one).
    """
    target, target_name, target_is_logits = _one_of("target_probs", target_probs, "target_logits", target_logits,
                                                    required=True)
    draft, draft_name, draft_is_logits = _one_of("draft_probs", draft_probs, "draft_logits", draft_logits)
    temperature = _temperature(temperature, target_is_logits or draft_is_logits)
    layout = V.chain_layout(draft_token_ids, target, target_name, cu_num_draft_tokens, max_draft_len)
    if draft is not None:
        V.check_draft_rows(draft_name, draft, layout)
    if uniforms is not None:
        V.check_uniforms("uniforms", uniforms, target)
    device = _validate.check_same_device(draft_token_ids=draft_token_ids, target=target, draft=draft,
                                         cu_num_draft_tokens=cu_num_draft_tokens, uniforms=uniforms)
    if uniforms is not None and seed is not None:
        raise ValueError("pass seed or uniforms, not both: injected uniforms replace the seeded draws")
    seed, seeds = (0, None) if uniforms is not None else V.check_seed_arg(seed, layout.batch, device)
    if validate:
        checks = _common_checks(draft_token_ids, layout, cu_num_draft_tokens)
        for name, t, is_logits in ((target_name, target, target_is_logits), (draft_name, draft, draft_is_logits)):
            if t is not None:
                (V.logits_rows if is_logits else V.probs_rows)(checks, name, t)
        if uniforms is not None:
            V.uniforms_in_range(checks, "uniforms", uniforms)
        checks.run()
    name = resolve_backend(device, backend)
    tokens, num = torch.ops.pyfuse.rejection_sample(
        draft_token_ids, target, draft, cu_num_draft_tokens, seeds, uniforms, target_is_logits, draft_is_logits,
        temperature, _validate.to_i64(seed), layout.width - 1, name)
    return SpecOutput(tokens, num)


def typical_accept(draft_token_ids, target_probs=None, *, target_logits=None, temperature=None,
                   posterior_threshold: float = 0.09, posterior_alpha: float = 0.3, cu_num_draft_tokens=None,
                   max_draft_len=None, validate: bool = True, backend: Optional[str] = None) -> SpecOutput:
    """Medusa's typical acceptance (lossy, deterministic): accept draft x while
    p(x) > min(posterior_threshold, posterior_alpha * exp(-H(p))), H(p) = -sum p log p; then emit the target
    argmax at the first rejection or at the bonus row. Defaults are Medusa's (epsilon 0.09, delta 0.3)."""
    target, target_name, target_is_logits = _one_of("target_probs", target_probs, "target_logits", target_logits,
                                                    required=True)
    temperature = _temperature(temperature, target_is_logits)
    eps = V.check_nonnegative("posterior_threshold", posterior_threshold)
    delta = V.check_nonnegative("posterior_alpha", posterior_alpha)
    layout = V.chain_layout(draft_token_ids, target, target_name, cu_num_draft_tokens, max_draft_len)
    device = _validate.check_same_device(draft_token_ids=draft_token_ids, target=target,
                                         cu_num_draft_tokens=cu_num_draft_tokens)
    if validate:
        checks = _common_checks(draft_token_ids, layout, cu_num_draft_tokens)
        (V.logits_rows if target_is_logits else V.probs_rows)(checks, target_name, target)
        checks.run()
    name = resolve_backend(device, backend)
    tokens, num = torch.ops.pyfuse.typical_accept(draft_token_ids, target, cu_num_draft_tokens, target_is_logits,
                                                  temperature, eps, delta, layout.width - 1, name)
    return SpecOutput(tokens, num)


def _one_of(probs_name, probs, logits_name, logits, required=False):
    if probs is not None and logits is not None:
        raise ValueError(f"pass {probs_name} or {logits_name}, not both")
    if probs is None and logits is None:
        if required:
            raise ValueError(f"one of {probs_name} or {logits_name} is required")
        return None, probs_name, False
    return (logits, logits_name, True) if probs is None else (probs, probs_name, False)


def _temperature(temperature, has_logits: bool) -> float:
    if temperature is None:
        return 1.0
    if not has_logits:
        raise ValueError("temperature applies to logits only; probabilities are used as given")
    return V.check_temperature("temperature", temperature)


def _common_checks(draft_token_ids, layout, cu_num_draft_tokens) -> V.ValueChecks:
    checks = V.ValueChecks()
    V.ids_in_vocab(checks, "draft_token_ids", draft_token_ids, layout.vocab)
    if cu_num_draft_tokens is not None:
        V.cu_consistent(checks, cu_num_draft_tokens, layout.num_draft, layout.width - 1)
    return checks


# ---- torch.library ops ----------------------------------------------------------------------------------

def _output_like(draft_token_ids, cu, max_draft_len):
    batch = draft_token_ids.shape[0] if cu is None else cu.shape[0] - 1
    dev = draft_token_ids.device
    return (torch.empty((batch, max_draft_len + 1), dtype=torch.int32, device=dev),
            torch.empty((batch,), dtype=torch.int32, device=dev))


@library_op("verify_greedy")
def _verify_greedy_op(draft_token_ids: torch.Tensor, target_logits: torch.Tensor,
                      cu_num_draft_tokens: Optional[torch.Tensor], max_draft_len: int,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return call_kernel("verify_greedy", backend, draft_token_ids, target_logits, cu_num_draft_tokens, max_draft_len)


@_verify_greedy_op.register_fake
def _(draft_token_ids, target_logits, cu_num_draft_tokens, max_draft_len, backend):
    return _output_like(draft_token_ids, cu_num_draft_tokens, max_draft_len)


@library_op("rejection_sample")
def _rejection_sample_op(draft_token_ids: torch.Tensor, target: torch.Tensor, draft: Optional[torch.Tensor],
                         cu_num_draft_tokens: Optional[torch.Tensor], seeds: Optional[torch.Tensor],
                         uniforms: Optional[torch.Tensor], target_is_logits: bool, draft_is_logits: bool,
                         temperature: float, seed: int, max_draft_len: int,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return call_kernel("rejection_sample", backend, draft_token_ids, target, draft, cu_num_draft_tokens, seeds,
                       uniforms, target_is_logits, draft_is_logits, temperature, _validate.from_i64(seed),
                       max_draft_len)


@_rejection_sample_op.register_fake
def _(draft_token_ids, target, draft, cu_num_draft_tokens, seeds, uniforms, target_is_logits, draft_is_logits,
      temperature, seed, max_draft_len, backend):
    return _output_like(draft_token_ids, cu_num_draft_tokens, max_draft_len)


@library_op("typical_accept")
def _typical_accept_op(draft_token_ids: torch.Tensor, target: torch.Tensor,
                       cu_num_draft_tokens: Optional[torch.Tensor], target_is_logits: bool, temperature: float,
                       posterior_threshold: float, posterior_alpha: float, max_draft_len: int,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return call_kernel("typical_accept", backend, draft_token_ids, target, cu_num_draft_tokens, target_is_logits,
                       temperature, posterior_threshold, posterior_alpha, max_draft_len)


@_typical_accept_op.register_fake
def _(draft_token_ids, target, cu_num_draft_tokens, target_is_logits, temperature, posterior_threshold,
      posterior_alpha, max_draft_len, backend):
    return _output_like(draft_token_ids, cu_num_draft_tokens, max_draft_len)


# ---- reference backend ----------------------------------------------------------------------------------

@register_kernel("verify_greedy", "reference")
def _verify_greedy_reference(ids, target, cu, max_draft_len):
    return ref.verify_greedy(ids, target, cu, max_draft_len)


@register_kernel("rejection_sample", "reference")
def _rejection_sample_reference(ids, target, draft, cu, seeds, uniforms, target_is_logits, draft_is_logits,
                                temperature, seed, max_draft_len):
    return ref.rejection_sample(ids, target, draft, target_is_logits, draft_is_logits, temperature, cu,
                                max_draft_len, seed, seeds, uniforms)


@register_kernel("typical_accept", "reference")
def _typical_accept_reference(ids, target, cu, target_is_logits, temperature, eps, delta, max_draft_len):
    return ref.typical_accept(ids, target, target_is_logits, temperature, eps, delta, cu, max_draft_len)


# ---- C++ backends (cpu, cuda): one flat argument list, see PYFUSE_SPEC_CHAIN_PARAMS ----------------------

def _row_strides(t, ragged):
    """(batch stride, row stride) of a rows tensor: [B, R, ...] padded, [R, ...] ragged."""
    return (0, t.stride(0)) if ragged else (t.stride(0), t.stride(1))


def _rows(t):
    """The vocabulary dimension must be unit-stride for the kernels (batch/row strides may be anything)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _chain_launch(mode, ids, target, draft, cu, seeds, uniforms, target_is_logits, draft_is_logits,
                  temperature, seed, max_draft_len, eps, delta):
    """(output tensors, flat argument tuple) for the C++ kernels."""
    ragged = cu is not None
    target, draft = _rows(target), _rows(draft)
    cu = cu.contiguous() if ragged else None
    tokens, num = _output_like(ids, cu, max_draft_len)
    ids_sb, ids_sk = (0, ids.stride(0)) if ragged else (ids.stride(0), ids.stride(1))
    t_sb, t_sk = _row_strides(target, ragged)
    d_sb, d_sk = _row_strides(draft, ragged) if draft is not None else (0, 0)
    if uniforms is not None:
        u_sb, u_sk = (0, uniforms.stride(1)) if ragged else (uniforms.stride(1), uniforms.stride(2))
        u_plane = uniforms.stride(0)
    else:
        u_plane = u_sb = u_sk = 0
    args = (mode, tokens.shape[0], target.shape[-1], max_draft_len + 1, ids.shape[0] if ragged else ids.shape[1],
            _ptr(cu), int(ragged and cu.dtype == torch.int64), ids.data_ptr(), int(ids.dtype == torch.int64),
            ids_sb, ids_sk, target.data_ptr(), dtype_code(target), int(target_is_logits), t_sb, t_sk,
            _ptr(draft), dtype_code(draft) if draft is not None else 0, int(draft_is_logits), d_sb, d_sk,
            temperature, _ptr(uniforms), u_plane, u_sb, u_sk, seed, _ptr(seeds), eps, delta,
            tokens.data_ptr(), num.data_ptr())
    return tokens, num, args


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _register_cxx(backend, run):
    @register_kernel("verify_greedy", backend)
    def _greedy(ids, target, cu, max_draft_len):
        return run(*_chain_launch(GREEDY, ids, target, None, cu, None, None, False, False, 1.0, 0, max_draft_len,
                                  0.0, 0.0))

    @register_kernel("rejection_sample", backend)
    def _rejection(ids, target, draft, cu, seeds, uniforms, target_is_logits, draft_is_logits, temperature, seed,
                   max_draft_len):
        return run(*_chain_launch(REJECTION, ids, target, draft, cu, seeds, uniforms, target_is_logits,
                                  draft_is_logits, temperature, seed, max_draft_len, 0.0, 0.0))

    @register_kernel("typical_accept", backend)
    def _typical(ids, target, cu, target_is_logits, temperature, eps, delta, max_draft_len):
        return run(*_chain_launch(TYPICAL, ids, target, None, cu, None, None, target_is_logits, False, temperature,
                                  0, max_draft_len, eps, delta))


def _run_cpu(tokens, num, args):
    if tokens.shape[0]:
        cpu_ext().spec_chain_verify(*args)
    return tokens, num


def _run_cuda(tokens, num, args):
    if tokens.shape[0]:
        cuda_ext().spec_chain_verify(*args, stream_of(tokens))
    return tokens, num


_register_cxx("cpu", _run_cpu)
_register_cxx("cuda", _run_cuda)


# ---- triton backend -------------------------------------------------------------------------------------

def _triton_run(mode, ids, target, draft, cu, seeds, uniforms, target_is_logits, draft_is_logits, temperature,
                seed, max_draft_len, eps, delta):
    from ..kernels import spec_chain as kernels

    ragged = cu is not None
    target, draft = _rows(target), _rows(draft)
    tokens, num = _output_like(ids, cu, max_draft_len)
    if tokens.shape[0]:
        u_strides = (0, 0, 0)
        if uniforms is not None:
            u_strides = (uniforms.stride(0),) + ((0, uniforms.stride(1)) if ragged else uniforms.stride()[1:])
        kernels.spec_chain(
            tokens, num, cu.contiguous() if ragged else None, ids,
            (0, ids.stride(0)) if ragged else ids.stride(), target, _row_strides(target, ragged),
            draft, _row_strides(draft, ragged) if draft is not None else (0, 0), uniforms, u_strides, seeds, seed,
            target.shape[-1], max_draft_len + 1, ids.shape[0] if ragged else ids.shape[1], temperature, eps, delta,
            mode, target_is_logits, draft_is_logits)
    return tokens, num


@register_kernel("verify_greedy", "triton")
def _verify_greedy_triton(ids, target, cu, max_draft_len):
    return _triton_run(GREEDY, ids, target, None, cu, None, None, False, False, 1.0, 0, max_draft_len, 0.0, 0.0)


@register_kernel("rejection_sample", "triton")
def _rejection_sample_triton(ids, target, draft, cu, seeds, uniforms, target_is_logits, draft_is_logits,
                             temperature, seed, max_draft_len):
    return _triton_run(REJECTION, ids, target, draft, cu, seeds, uniforms, target_is_logits, draft_is_logits,
                       temperature, seed, max_draft_len, 0.0, 0.0)


@register_kernel("typical_accept", "triton")
def _typical_accept_triton(ids, target, cu, target_is_logits, temperature, eps, delta, max_draft_len):
    return _triton_run(TYPICAL, ids, target, None, cu, None, None, target_is_logits, False, temperature, 0,
                       max_draft_len, eps, delta)

"""``pyfuse.spec.speculative_generate``: a small, exact speculative-decoding loop for Hugging Face causal LMs,
verifying with ``verify_greedy`` (temperature 0) or ``rejection_sample`` (temperature > 0).

Batches: every request keeps its own pair of KV caches (``DynamicCache``, cropped after each verification to
the accepted prefix), so ragged acceptance needs no padding inside the sequence; the model forwards run per
request and the verification of all active requests runs as one batched op. Left-padded prompts
(``attention_mask``) are unpadded per request and the output keeps the prompt as given.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from .. import _validate as V
from ..philox import rand
from .chain import rejection_sample, verify_greedy

_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64 constants: derive independent per-request, per-step seeds
_MASK64 = (1 << 64) - 1
_DRAFT_STREAM = 1  # pyfuse.rand stream of the draft-token draws (verification uses its own Philox purposes)


class GenerateOutput(NamedTuple):
    """sequences ``[B, P + max_new]``: prompt (as given) then generated tokens, ``pad_token_id`` after a
    request's end; num_generated ``[B]``; drafted / accepted ``[B]`` draft tokens proposed / accepted over the
    run (acceptance rate = accepted / drafted); steps: verification rounds."""

    sequences: torch.Tensor
    num_generated: torch.Tensor
    drafted: torch.Tensor
    accepted: torch.Tensor
    steps: int


def _mix(*words: int) -> int:
    """splitmix64 of a word sequence: an int64-range seed (mod 2**64) per (seed, request, step)."""
    x = 0
    for w in words:
        x = (x + (w & _MASK64) + _GOLDEN) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x


class _Request:
    """One request: its tokens so far and its two caches."""

    def __init__(self, tokens: torch.Tensor, cache_cls):
        self.tokens = tokens  # 1-D, no padding
        self.prompt_len = tokens.numel()
        self.target_cache = cache_cls()
        self.draft_cache = cache_cls()
        self.done = False

    @property
    def generated(self) -> torch.Tensor:
        return self.tokens[self.prompt_len:]


def _forward(model, cache, tokens: torch.Tensor) -> torch.Tensor:
    """Feed the tokens the cache has not seen; returns float32 logits [len, V] of the fed positions."""
    seen = cache.get_seq_length()
    out = model(input_ids=tokens[None, seen:], past_key_values=cache, use_cache=True)
    return out.logits[0].float()


def _crop(cache, length: int):
    cache.crop(length - cache.get_seq_length())  # removes the tokens past `length` (0: no-op)


def _draw(logits: torch.Tensor, temperature: float, seed: int, offset: int) -> int:
    """Sample one token from softmax(logits / T) by inverse CDF on a Philox uniform."""
    probs = torch.softmax(logits / temperature, dim=-1).double()
    u = float(rand(1, seed=seed, offset=offset, stream=_DRAFT_STREAM)[0])
    cdf = torch.cumsum(probs, 0)
    return int(torch.searchsorted(cdf, u * float(cdf[-1]), right=True).clamp(max=probs.numel() - 1))


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@torch.no_grad()
def speculative_generate(target_model, draft_model, input_ids, *, num_draft_tokens: int = 4, max_new_tokens: int,
                         temperature: float = 0.0, seed: int = 0, attention_mask=None,
                         eos_token_id=None, pad_token_id=None) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens per request from ``target_model`` with ``draft_model``
    proposing ``num_draft_tokens`` tokens per round.

    temperature 0: greedy, identical to ``target_model.generate(do_sample=False)`` up to float rounding of the
    batched forward. temperature > 0: tokens follow the target's softmax(logits / T) exactly (rejection
    sampling); draws are Philox-seeded from ``seed``, request index and round, so a run is reproducible.
    eos_token_id / pad_token_id default to the target's generation config (pad falls back to eos, then 0).
    """
    V.check_tensor("input_ids", input_ids, dtypes=(torch.int64, torch.int32), ndim=2)
    num_draft_tokens = _check_int("num_draft_tokens", num_draft_tokens, 1)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise ValueError(f"temperature must be a float >= 0, got {temperature!r}")
    seed = V.check_seed("seed", seed)
    batch, width = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    V.check_tensor("attention_mask", attention_mask, ndim=2)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, "
                         f"got {list(attention_mask.shape)}")
    vocab = target_model.config.vocab_size
    if draft_model.config.vocab_size != vocab:
        raise ValueError(f"draft_model and target_model must share the vocabulary: vocab sizes "
                         f"{draft_model.config.vocab_size} and {vocab}")
    config = target_model.generation_config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos = set() if eos is None else ({int(eos)} if isinstance(eos, numbers.Integral) else {int(e) for e in eos})
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    pad = pad if pad is not None else (min(eos) if eos else 0)

    from transformers import DynamicCache

    device = input_ids.device
    requests = []
    for b in range(batch):
        tokens = input_ids[b][attention_mask[b].bool()].to(torch.int64)
        if tokens.numel() == 0:
            raise ValueError(f"request {b} has an empty prompt (attention_mask all zero)")
        requests.append(_Request(tokens, DynamicCache))
    drafted = torch.zeros(batch, dtype=torch.int64)
    accepted = torch.zeros(batch, dtype=torch.int64)
    steps = 0
    for r in requests:
        r.done = max_new_tokens == 0
    while not all(r.done for r in requests):
        active = [b for b, r in enumerate(requests) if not r.done]
        drafts, draft_logits, target_logits = [], [], []
        for b in active:
            r = requests[b]
            step_seed = _mix(seed, b, steps)
            proposal, logits_q = [], []
            for k in range(num_draft_tokens):
                logits = _forward(draft_model, r.draft_cache, torch.cat([r.tokens, r.tokens.new_tensor(proposal)]))[-1]
                token = int(logits.argmax()) if temperature == 0 else _draw(logits, temperature, step_seed, k)
                proposal.append(token)
                logits_q.append(logits)
            drafts.append(proposal)
            draft_logits.append(torch.stack(logits_q))
            fed = torch.cat([r.tokens, r.tokens.new_tensor(proposal)])
            target_logits.append(_forward(target_model, r.target_cache, fed)[-num_draft_tokens - 1:])
        draft_ids = torch.tensor(drafts, dtype=torch.int64, device=device)
        target_rows = torch.stack(target_logits)
        if temperature == 0:
            out = verify_greedy(draft_ids, target_rows)
        else:
            seeds = torch.tensor([V.to_i64(_mix(seed, b, steps, 1)) for b in active], device=device)
            out = rejection_sample(draft_ids, target_logits=target_rows, draft_logits=torch.stack(draft_logits),
                                   temperature=float(temperature), seed=seeds)
        steps += 1
        for i, b in enumerate(active):
            r = requests[b]
            n = int(out.num_accepted[i])
            emitted = out.token_ids[i, : n + 1].to(torch.int64).tolist()
            drafted[b] += num_draft_tokens
            accepted[b] += n
            budget = max_new_tokens - r.generated.numel()
            emitted = emitted[:budget]
            stop = next((j for j, t in enumerate(emitted) if t in eos), None)
            if stop is not None:
                emitted = emitted[: stop + 1]
            old = r.tokens.numel()
            r.tokens = torch.cat([r.tokens, r.tokens.new_tensor(emitted)])
            r.done = stop is not None or r.generated.numel() >= max_new_tokens
            # Keep exactly the accepted prefix in the caches; the last emitted token is fed next round.
            _crop(r.target_cache, old + n)
            _crop(r.draft_cache, min(r.draft_cache.get_seq_length(), old + n))
    longest = max(r.generated.numel() for r in requests)
    sequences = torch.full((batch, width + longest), pad, dtype=input_ids.dtype, device=device)
    sequences[:, :width] = input_ids
    for b, r in enumerate(requests):
        sequences[b, width: width + r.generated.numel()] = r.generated
    num_generated = torch.tensor([r.generated.numel() for r in requests])
    return GenerateOutput(sequences, num_generated, drafted, accepted, steps)

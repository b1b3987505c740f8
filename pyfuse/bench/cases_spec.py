"""Benchmark cases for chain verification (``pyfuse.spec.rejection_sample``, ``verify_greedy``).

Peers for ``rejection_sample`` (same inputs, same random-draw count, each on its own generator):

* ``torch.batched``: a plain-torch batched rejection sampler as people write it: gather p and q at the draft
  ids, ``torch.rand``, cumprod of acceptance, residual ``relu(p - q)`` normalised at every draft position,
  pick each request's row, ``torch.multinomial``.
* ``torch.batched-row``: the same, but gathering each request's one final row before the residual (the
  leanest plain-torch formulation).
* ``transformers``: ``transformers.generation.utils._speculative_sampling`` (batch size 1 only; logits in,
  so the probability cases hand it log-probabilities).

Probabilities are float32 ``[B, K+1, V]`` target / ``[B, K, V]`` draft; logits are bfloat16 with temperature 1.
Drafts are sampled from q, so acceptance is realistic (about sum(min(p, q)) per position).
"""
from __future__ import annotations

import torch

from pyfuse.bench.registry import BenchCase, backend_providers, register_cases
from pyfuse.reference import spec as ref
from pyfuse.spec import rejection_sample, verify_greedy

SEED = 1234


def torch_batched_rejection(draft_ids, target_probs, draft_probs, row_first=False):
    """Plain-torch batched rejection sampling; returns (token_ids [B, K+1] padded -1, num_accepted [B])."""
    batch, k = draft_ids.shape
    idx = draft_ids[..., None]
    p_x = target_probs[:, :k].gather(2, idx)[..., 0]
    q_x = draft_probs.gather(2, idx)[..., 0]
    accepted = (torch.rand(batch, k, device=draft_ids.device) * q_x < p_x).int().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(batch, device=draft_ids.device)
    rejected = (accepted < k)[:, None]
    if row_first:
        p_row = target_probs[rows, accepted]
        q_row = draft_probs[rows, accepted.clamp(max=k - 1)]
        residual = torch.where(rejected, (p_row - q_row).clamp_min(0), p_row)
    else:
        residual = torch.cat([(target_probs[:, :k] - draft_probs).clamp_min(0), target_probs[:, k:]], dim=1)
        residual = residual[rows, accepted]
    total = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(total > 0, residual / total, target_probs[rows, accepted])
    final = torch.multinomial(residual, 1)[:, 0]
    pos = torch.arange(k + 1, device=draft_ids.device)
    ids = torch.cat([draft_ids, draft_ids.new_full((batch, 1), -1)], dim=1)
    tokens = torch.where(pos < accepted[:, None], ids, -1)
    tokens = torch.where(pos == accepted[:, None], final[:, None], tokens)
    return tokens.int(), accepted.int()


def _inputs(batch, k, vocab, device, logits):
    g = torch.Generator(device="cpu").manual_seed(SEED)
    tl = torch.randn(batch, k + 1, vocab, generator=g) * 3
    dl = tl[:, :k] + torch.randn(batch, k, vocab, generator=g)  # a draft close to the target
    q = torch.softmax(dl, -1)
    ids = torch.multinomial(q.reshape(-1, vocab), 1, generator=g).view(batch, k)
    if logits:
        return ids.to(device), tl.to(device, torch.bfloat16), dl.to(device, torch.bfloat16)
    return ids.to(device), torch.softmax(tl, -1).to(device), q.to(device)


def _transformers_provider(ids, target, draft, logits):
    try:
        from transformers.generation.utils import _speculative_sampling
    except ImportError as err:
        return None, f"transformers not installed ({err})"
    k = ids.shape[1]
    if logits:
        new_logits, cand_logits = target.float(), draft.float()
    else:
        new_logits, cand_logits = target.log(), draft.log()
    return (lambda: _speculative_sampling(ids, cand_logits, k, new_logits)), None


def _rejection_case(batch, k, vocab, device, logits):
    ids, target, draft = _inputs(batch, k, vocab, device, logits)
    kind = "bf16 logits" if logits else "float32 probs"
    if logits:
        def run(b):
            return lambda: rejection_sample(ids, target_logits=target, draft_logits=draft, seed=SEED, backend=b)
        reference = lambda: ref.rejection_sample(ids, target, draft, True, True, 1.0, None, k, SEED, None, None)  # noqa: E731
    else:
        def run(b):
            return lambda: rejection_sample(ids, target, draft, seed=SEED, backend=b)
        reference = lambda: ref.rejection_sample(ids, target, draft, False, False, 1.0, None, k, SEED, None, None)  # noqa: E731
    providers, skipped = backend_providers(device, run)
    # The default backend with validate=False: the hot-loop cost without the data checks.
    if logits:
        providers["pyfuse:novalidate"] = lambda: rejection_sample(ids, target_logits=target, draft_logits=draft,
                                                                  seed=SEED, validate=False)
    else:
        providers["pyfuse:novalidate"] = lambda: rejection_sample(ids, target, draft, seed=SEED, validate=False)
    providers["reference"] = reference
    peers = []
    if not logits:
        providers["torch.batched"] = lambda: torch_batched_rejection(ids, target, draft)
        providers["torch.batched-row"] = lambda: torch_batched_rejection(ids, target, draft, row_first=True)
        peers += ["torch.batched", "torch.batched-row"]
    if batch == 1:
        fn, why = _transformers_provider(ids, target, draft, logits)
        if fn is None:
            skipped["transformers"] = why
        else:
            providers["transformers"] = fn
            peers.append("transformers")
    # Floor: the draft-id gathers, plus one final row of p and q per request, plus the output.
    elem = target.element_size()
    floor = batch * (2 * k * elem + 2 * vocab * elem + 4 * (k + 2))
    return BenchCase(family="spec", op="rejection_sample", params=f"B={batch} K={k} V={vocab} {kind}",
                     bytes_floor=floor, providers=providers, peers=tuple(peers), skipped=skipped)


def _greedy_case(batch, k, vocab, device):
    ids, target, _ = _inputs(batch, k, vocab, device, True)
    ids = target[:, :k].float().argmax(-1)  # all accepted: every row is read (worst case)
    providers, skipped = backend_providers(device, lambda b: lambda: verify_greedy(ids, target, backend=b))
    providers["reference"] = lambda: ref.verify_greedy(ids, target, None, k)
    return BenchCase(family="spec", op="verify_greedy", params=f"B={batch} K={k} V={vocab} bf16 logits",
                     bytes_floor=target.numel() * target.element_size(), providers=providers,
                     peers=("reference",), skipped=skipped)


@register_cases("spec")
def cases(device, quick):
    if quick:
        shapes = [(1, 5, 32000, False), (64, 8, 128256, False), (8, 4, 32000, True)]
    else:
        shapes = [(1, 5, 32000, False), (1, 5, 32000, True)]
        shapes += [(b, k, v, lg) for lg in (False, True) for b in (1, 8, 64) for k in (4, 8)
                   for v in (32000, 128256, 151936)]
    for batch, k, vocab, logits in shapes:
        yield _rejection_case(batch, k, vocab, device, logits)
    yield _greedy_case(8 if quick else 64, 4 if quick else 8, 32000 if quick else 128256, device)

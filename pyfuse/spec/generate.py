"""``pyfuse.spec.speculative_generate``: a small, exact speculative-decoding loop for Hugging Face causal LMs,
verifying a chain of drafts with ``verify_greedy`` (temperature 0) or ``rejection_sample`` (temperature > 0),
or a draft tree (``tree=``) with ``verify_tree`` (modes ``greedy`` / ``stochastic``).

Trees are scored in one forward per level (draft) and one forward (target) with a 4D tree-attention mask: every
node sees the cached prefix and its own ancestors, at position prefix + depth (an additive float mask, as the
eager and sdpa attention implementations take it). Tree entries never stay in a
cache: after each forward the cache is cropped back to the verified prefix.

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
from .tree import verify_tree

_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64 constants: derive independent per-request, per-step seeds
_MASK64 = (1 << 64) - 1
_DRAFT_STREAM = 1  # pyfuse.rand stream of the draft-token draws (verification uses its own Philox purposes)


class GenerateOutput(NamedTuple):
    """sequences ``[B, P + G]`` (G = longest generation, <= max_new_tokens): prompt (as given), generated
    tokens, ``pad_token_id`` after a request's end; num_generated ``[B]``; drafted / accepted ``[B]``: draft
    tokens (tree nodes) proposed / accepted over the run; steps: verification rounds."""

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
    drop = cache.get_seq_length() - length
    if drop > 0:  # never crop(0): transformers 4.x reads it as "keep nothing"
        cache.crop(-drop)


def _draw(logits: torch.Tensor, temperature: float, seed: int, offset: int) -> int:
    """Sample one token from softmax(logits / T) by inverse CDF on a Philox uniform."""
    probs = torch.softmax(logits / temperature, dim=-1).double()
    u = float(rand(1, seed=seed, offset=offset, stream=_DRAFT_STREAM)[0])
    cdf = torch.cumsum(probs, 0)
    return int(torch.searchsorted(cdf, u * float(cdf[-1]), right=True).clamp(max=probs.numel() - 1))


class _TreeShape:
    """A full draft tree with ``branching[d]`` children per node at depth d, nodes in BFS order."""

    def __init__(self, branching):
        self.parent, self.depth, level = [-1], [0], [0]
        for width in branching:
            nxt = []
            for p in level:
                for _ in range(width):
                    nxt.append(len(self.parent))
                    self.parent.append(p)
                    self.depth.append(self.depth[p] + 1)
            level = nxt
        self.branching = list(branching)
        n = len(self.parent)
        self.first, self.sibling = [-1] * n, [-1] * n
        for node in range(n - 1, 0, -1):  # siblings are consecutive in BFS order
            p = self.parent[node]
            self.sibling[node] = self.first[p]
            self.first[p] = node

    def mask(self, cached: int, linear: int, nodes: int, dtype) -> torch.Tensor:
        """Additive [1, 1, linear + nodes, cached + linear + nodes] mask: the linear tokens are causal, tree node
        i (1..nodes) sees the cache, every linear token, its ancestors and itself."""
        total = cached + linear + nodes
        allowed = torch.zeros(linear + nodes, total, dtype=torch.bool)
        allowed[:, :cached] = True
        allowed[:linear, cached:cached + linear] = torch.ones(linear, linear, dtype=torch.bool).tril()
        allowed[linear:, cached:cached + linear] = True
        for i in range(1, nodes + 1):
            a = i
            while a > 0:
                allowed[linear + i - 1, cached + linear + a - 1] = True
                a = self.parent[a]
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask[None, None]


def _tree_forward(model, cache, tokens, shape: _TreeShape, nodes: torch.Tensor):
    """Feed the unseen prompt tokens (the last one is the root) and the tree nodes 1..len(nodes); returns
    float32 logits [1 + len(nodes), V] of the root and the nodes, and crops the cache to len(tokens) - 1."""
    cached = cache.get_seq_length()
    linear = tokens.numel() - cached
    ids = torch.cat([tokens[cached:], nodes])[None]
    root_pos = tokens.numel() - 1
    positions = torch.tensor(list(range(cached, cached + linear)) +
                             [root_pos + d for d in shape.depth[1:nodes.numel() + 1]], device=tokens.device)
    mask = shape.mask(cached, linear, nodes.numel(), model.dtype).to(tokens.device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions[None], past_key_values=cache,
                use_cache=True)
    _crop(cache, root_pos)
    return out.logits[0, linear - 1:].float()


def _draft_tree(model, r, shape: _TreeShape, temperature: float, seed: int):
    """Grow the tree level by level: top-b children (greedy) or b i.i.d. draws from softmax(logits / T).
    Returns the node tokens [N] (root first) and the draft distribution rows [N, V] the children came from."""
    nodes = r.tokens.new_empty(0)
    rows = []
    for level, width in enumerate(shape.branching):
        logits = _tree_forward(model, r.draft_cache, r.tokens, shape, nodes)
        children = []
        for node in [i for i, d in enumerate(shape.depth) if d == level]:
            row = logits[node]
            if temperature == 0:
                children += row.topk(width).indices.tolist()
            else:
                children += [_draw(row, temperature, seed, node * width + k) for k in range(width)]
            rows.append(torch.softmax(row / (temperature or 1.0), -1))
        nodes = torch.cat([nodes, nodes.new_tensor(children)])
    return torch.cat([r.tokens[-1:], nodes]), torch.stack(rows)


def _tree_round(target_model, draft_model, requests, active, shape, temperature, seed, steps):
    """One verification round of tree drafts for the active requests: (token_ids, accepted counts)."""
    cand, target_rows, draft_rows = [], [], []
    for b in active:
        r = requests[b]
        tokens, q = _draft_tree(draft_model, r, shape, temperature, _mix(seed, b, steps))
        cand.append(tokens)
        logits = _tree_forward(target_model, r.target_cache, r.tokens, shape, tokens[1:])
        target_rows.append(logits if temperature == 0 else torch.softmax(logits / temperature, -1))
        # Leaves draft nothing; their rows are unused but must be distributions.
        draft_rows.append(torch.cat([q, target_rows[-1][q.shape[0]:]]))
    batch = len(active)
    first = torch.tensor([shape.first] * batch, device=cand[0].device)
    sibling = torch.tensor([shape.sibling] * batch, device=cand[0].device)
    depth = len(shape.branching)
    if temperature == 0:
        out = verify_tree(torch.stack(cand), first, sibling, torch.stack(target_rows), mode="greedy",
                          max_depth=depth)
    else:
        seeds = torch.tensor([V.to_i64(_mix(seed, b, steps, 1)) for b in active], device=first.device)
        out = verify_tree(torch.stack(cand), first, sibling, torch.stack(target_rows), mode="stochastic",
                          draft_probs=torch.stack(draft_rows), max_depth=depth, seed=seeds)
    return out.token_ids, out.accept_len


def _chain_round(target_model, draft_model, requests, active, k, temperature, seed, steps):
    """One verification round of k chained drafts for the active requests: (token_ids, accepted counts)."""
    drafts, draft_logits, target_logits = [], [], []
    for b in active:
        r = requests[b]
        step_seed = _mix(seed, b, steps)
        proposal, logits_q = [], []
        for i in range(k):
            fed = torch.cat([r.tokens, r.tokens.new_tensor(proposal)])
            logits = _forward(draft_model, r.draft_cache, fed)[-1]
            proposal.append(int(logits.argmax()) if temperature == 0 else _draw(logits, temperature, step_seed, i))
            logits_q.append(logits)
        drafts.append(proposal)
        draft_logits.append(torch.stack(logits_q))
        fed = torch.cat([r.tokens, r.tokens.new_tensor(proposal)])
        target_logits.append(_forward(target_model, r.target_cache, fed)[-k - 1:])
    draft_ids = torch.tensor(drafts, dtype=torch.int64, device=requests[active[0]].tokens.device)
    target_rows = torch.stack(target_logits)
    if temperature == 0:
        out = verify_greedy(draft_ids, target_rows)
    else:
        seeds = torch.tensor([V.to_i64(_mix(seed, b, steps, 1)) for b in active], device=draft_ids.device)
        out = rejection_sample(draft_ids, target_logits=target_rows, draft_logits=torch.stack(draft_logits),
                               temperature=float(temperature), seed=seeds)
    return out.token_ids, out.num_accepted


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


@torch.no_grad()
def speculative_generate(target_model, draft_model, input_ids, *, num_draft_tokens: int = 4, max_new_tokens: int,
                         temperature: float = 0.0, seed: int = 0, tree=None, attention_mask=None,
                         eos_token_id=None, pad_token_id=None) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` tokens per request from ``target_model`` with ``draft_model``
    proposing ``num_draft_tokens`` tokens per round, or with ``tree=[b_1, ..., b_D]`` a draft tree of b_d
    children per node at depth d (top-b_d at temperature 0, b_d i.i.d. draws from the draft otherwise, as the
    stochastic mode of ``verify_tree`` requires).

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
    shape = None
    if tree is not None:
        if isinstance(tree, (str, bytes)) or not hasattr(tree, "__iter__") or len(list(tree)) == 0:
            raise ValueError(f"tree must be a non-empty sequence of branching factors, got {tree!r}")
        shape = _TreeShape([_check_int("tree entries", w, 1) for w in tree])
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
        if shape is None:
            token_ids, counts = _chain_round(target_model, draft_model, requests, active, num_draft_tokens,
                                             temperature, seed, steps)
        else:
            token_ids, counts = _tree_round(target_model, draft_model, requests, active, shape, temperature, seed,
                                            steps)
        steps += 1
        for i, b in enumerate(active):
            r = requests[b]
            n = int(counts[i])
            emitted = token_ids[i, : n + 1].to(torch.int64).tolist()
            drafted[b] += num_draft_tokens if shape is None else len(shape.parent) - 1
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
            _crop(r.draft_cache, old + n)
    longest = max(r.generated.numel() for r in requests)
    sequences = torch.full((batch, width + longest), pad, dtype=input_ids.dtype, device=device)
    sequences[:, :width] = input_ids
    for b, r in enumerate(requests):
        sequences[b, width: width + r.generated.numel()] = r.generated
    num_generated = torch.tensor([r.generated.numel() for r in requests])
    return GenerateOutput(sequences, num_generated, drafted, accepted, steps)

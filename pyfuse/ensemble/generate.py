"""Ensemble generation with Hugging Face causal LMs whose tokenizers differ.

Every model keeps its own token ids and its own KV cache. Each step runs one forward per model on the
tokens it has not seen yet (one token after a normal step), the fused op picks a union token, and the
token is appended to every model: as the model's own id when it has a single token for those bytes,
otherwise by re-tokenising a short look-behind window of the model's text and dropping from its cache
only the tokens after the common prefix.

Batching: the rows of one model share one cache. Prompts are left-padded; a token dropped for one row
is masked out of that row's attention (a hole, with the following tokens given the positions they would
have had after a crop) and tail columns no row uses any more are cropped from the cache for real. A row
stops at the union end-of-sequence token; finished rows stay in the batch, fed nothing.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Sequence

import torch

from ..philox import rand
from .ops import next_token, union_topk
from .vocab import VocabMap

# Re-tokenisation starts at most this many tokens back, at the nearest word start.
LOOKBEHIND = 8
# Prepended when re-encoding a window and stripped again, so that a tokenizer adding a dummy-prefix
# space (SentencePiece) encodes the window as text in the middle of a line.
ANCHOR = "\n"


def generate(models: Sequence[torch.nn.Module], tokenizers: Sequence, prompts: str | Sequence[str], *,
             weights=None, max_new_tokens: int, greedy: bool = True, seed: int | None = None,
             mode: str = "prob", top_k: int | None = None, vmap: VocabMap | None = None):
    """Generate from an ensemble of Hugging Face causal LMs; returns the generated text of each prompt
    (a `str` for a `str` prompt, else a list).

    `weights`: one non-negative weight per model (default equal). `mode`: "prob" (weighted mean of the
    models' probabilities) or "logprob" (product of experts). `greedy=False` samples with pyfuse's Philox
    (`seed` required; step t uses Philox stream t). `top_k`: choose among the UniTE-style top-k union
    candidates (`pyfuse.ensemble.union_topk`) instead of the full union (`next_token`). `vmap`: a
    `VocabMap` of these tokenizers (built with `VocabMap.from_tokenizers` when None).
    """
    models, tokenizers, batch = _check_args(models, tokenizers, prompts, max_new_tokens, greedy, seed)
    sizes = [_logits_width(m, model) for m, model in enumerate(models)]
    if vmap is None:
        vmap = VocabMap.from_tokenizers(tokenizers, model_vocab_sizes=sizes)
    elif not isinstance(vmap, VocabMap):
        raise TypeError(f"vmap must be a VocabMap, got {type(vmap).__name__}")
    elif vmap.num_models != len(models) or list(vmap.vocab_sizes) != sizes:
        raise ValueError(f"vmap was built for vocabularies {list(vmap.vocab_sizes)}, the models' logits "
                         f"have widths {sizes}")
    device = _device(models[0])
    streams = [_Stream(model, tok, vmap, m, batch) for m, (model, tok) in enumerate(zip(models, tokenizers))]
    eos = vmap.eos_id
    text = [bytearray() for _ in batch]
    active = [True] * len(batch)
    with torch.no_grad():
        for step in range(max_new_tokens):
            logits = [s.forward(active).to(device) for s in streams]
            if len({x.dtype for x in logits}) > 1:  # the op takes one dtype
                logits = [x.float() for x in logits]
            chosen = _choose(logits, vmap, weights, greedy, seed, step, mode, top_k).tolist()
            for b, u in enumerate(chosen):
                if not active[b]:
                    continue
                if u < 0 or u == eos:
                    active[b] = False
                    continue
                data = vmap.token_bytes(u)
                text[b] += data
                for s in streams:
                    s.append(b, u, data)
            if not any(active):
                break
    texts = [bytes(t).decode("utf-8", errors="replace") for t in text]
    return texts[0] if isinstance(prompts, str) else texts


def _choose(logits, vmap, weights, greedy, seed, step, mode, top_k) -> torch.Tensor:
    """Union id per row (-1: nothing has positive probability). `step` is the Philox stream, so that
    every step draws fresh numbers."""
    if top_k is None:
        return next_token(logits, vmap, weights, greedy=greedy, seed=seed, stream=step, mode=mode).union_ids
    probs, ids = union_topk(logits, vmap, top_k, weights, mode=mode)  # sorted, best first
    if greedy:
        return ids[:, 0]
    # Inverse-CDF draw over the k candidates; the tail past the last real candidate is never picked.
    cdf = torch.cumsum(probs, dim=1)
    target = rand(probs.shape[0], seed=seed, stream=step, device=probs.device) * cdf[:, -1]
    last = (ids >= 0).sum(dim=1) - 1
    pick = torch.minimum((cdf <= target[:, None]).sum(dim=1), last.clamp(min=0))
    return torch.gather(ids, 1, pick[:, None])[:, 0]


class _Stream:
    """One model's view of the batch.

    Per row: `ids` (prompt + generated, as this model tokenises them), `slots[j]` (cache column of
    ids[j], for the ids already fed) and `pending` (generated bytes the model cannot take yet: an
    incomplete UTF-8 character it has no byte tokens for). `mask` [B, S] marks the live cache columns.
    """

    def __init__(self, model, tok, vmap: VocabMap, m: int, prompts: list[str]):
        self.model, self.tok, self.vmap = model, tok, vmap
        self.device = _device(model)
        self.to_union = vmap.to_union[m].tolist()
        self.from_union = vmap.from_union[m].tolist()
        self.ids = []
        for b, p in enumerate(prompts):
            ids = list(tok(p)["input_ids"])
            if not ids:
                raise ValueError(f"prompts[{b}] encodes to no tokens for tokenizers[{m}]")
            self.ids.append(ids)
        self.n_prompt = [len(x) for x in self.ids]
        self.slots: list[list[int]] = [[] for _ in prompts]
        self.pending = [b""] * len(prompts)
        self.mask = torch.zeros(len(prompts), 0, dtype=torch.long, device=self.device)
        self.cache = None
        self.holes = False
        self.anchor_ids = self._encode_plain(ANCHOR)
        params = inspect.signature(model.forward).parameters
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        byte_union = [vmap.text_id(bytes([x])) for x in range(256)]
        self.byte_ids = [-1 if u is None else self.from_union[u] for u in byte_union]

    # -- forward ---------------------------------------------------------------------------
    def forward(self, active: list[bool]) -> torch.Tensor:
        """Feed every active row the ids it has not seen; returns the next-token logits [B, V]."""
        feeds = []
        for b, on in enumerate(active):
            if not on:
                feeds.append([])
                continue
            if len(self.slots[b]) == len(self.ids[b]):  # nothing new: recompute the last token
                self._unfeed(b, len(self.ids[b]) - 1)
            feeds.append(self.ids[b][len(self.slots[b]):])
        self._crop_dead_tail()
        n = max(len(f) for f in feeds)
        S = self.mask.shape[1]
        B = len(feeds)
        input_ids = torch.zeros(B, n, dtype=torch.long)
        new_mask = torch.zeros(B, n, dtype=torch.long)
        positions = torch.zeros(B, n, dtype=torch.long)
        for b, f in enumerate(feeds):
            k = len(f)
            if k:
                p = len(self.slots[b])  # live tokens before the new ones: the next position
                input_ids[b, n - k:] = torch.tensor(f)
                new_mask[b, n - k:] = 1
                positions[b, n - k:] = torch.arange(p, p + k)
                self.slots[b].extend(range(S + n - k, S + n))
        self.mask = torch.cat([self.mask, new_mask.to(self.device)], dim=1)
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=self.mask,
                         position_ids=positions.to(self.device), past_key_values=self.cache,
                         use_cache=True, **self.extra)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    def _unfeed(self, b: int, keep: int) -> None:
        """Drop row b's cache columns of ids[keep:] (they are fed again or replaced)."""
        dropped = self.slots[b][keep:]
        if dropped:
            self.mask[b, torch.tensor(dropped, device=self.device)] = 0
            del self.slots[b][keep:]
            self.holes = True

    def _crop_dead_tail(self) -> None:
        """Crop trailing cache columns that no row uses any more (always the case at batch size 1)."""
        if not self.holes:
            return
        self.holes = False
        live = torch.nonzero(self.mask.any(dim=0)).flatten()
        keep = int(live[-1]) + 1 if live.numel() else 0
        cut = self.mask.shape[1] - keep
        if cut > 0:
            self.cache.crop(-cut)
            self.mask = self.mask[:, :keep]

    # -- appending a chosen union token ----------------------------------------------------
    def append(self, b: int, u: int, data: bytes) -> None:
        own = self.from_union[u]
        if own >= 0 and not self.pending[b]:
            self.ids[b].append(own)
        elif data:
            self._resync(b, data)
        # else: a special token this model lacks; it stands for no text.

    def _token_bytes(self, i: int) -> bytes | None:
        """Bytes of this model's id i; None for specials and ids that stand for nothing."""
        u = self.to_union[i] if 0 <= i < len(self.to_union) else -1
        if u < 0 or self.vmap.token_role(u) is not None:
            return None
        return self.vmap.token_bytes(u)

    def _resync(self, b: int, data: bytes) -> None:
        """Re-tokenise the window (nearest word start within LOOKBEHIND generated tokens) + pending +
        data, keep the common prefix with the current ids, replace the rest."""
        ids = self.ids[b]
        start = len(ids)
        window_bytes = []
        for j in range(len(ids) - 1, max(self.n_prompt[b], len(ids) - LOOKBEHIND) - 1, -1):
            tb = self._token_bytes(ids[j])
            if tb is None:
                break
            start = j
            window_bytes.append(tb)
            if tb.startswith(b" "):
                break
        old = ids[start:]
        new, self.pending[b] = self._encode(b"".join(reversed(window_bytes)) + self.pending[b] + data)
        p = 0
        while p < min(len(old), len(new)) and old[p] == new[p]:
            p += 1
        keep = start + p
        self._unfeed(b, keep)
        del ids[keep:]
        ids.extend(new[p:])

    def _encode(self, data: bytes) -> tuple[list[int], bytes]:
        """(ids, left-over bytes) for text bytes: valid UTF-8 through the tokenizer; bytes that are not
        (a character split across union tokens, invalid UTF-8) as the model's byte tokens when it has
        them. An incomplete character at the end without byte tokens is left over for the next step;
        invalid bytes the model cannot spell are skipped for this model."""
        ids: list[int] = []
        pos = 0
        while pos < len(data):
            try:
                ids += self._encode_text(data[pos:].decode("utf-8"))
                break
            except UnicodeDecodeError as err:
                ids += self._encode_text(data[pos:pos + err.start].decode("utf-8"))
                bad = data[pos + err.start:pos + err.end]
                spelled = [self.byte_ids[x] for x in bad]
                if pos + err.end == len(data) and err.reason == "unexpected end of data" and min(spelled) < 0:
                    return ids, bad
                ids += [i for i in spelled if i >= 0]
                pos += err.end
        return ids, b""

    def _encode_text(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self._encode_plain(ANCHOR + text)
        k = len(self.anchor_ids)
        if ids[:k] == self.anchor_ids:
            return ids[k:]
        return self._encode_plain(text)  # the anchor merged with the text: encode it alone

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _logits_width(m: int, model) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        return int(emb.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(size, int):
        raise TypeError(f"models[{m}] must be a Hugging Face causal LM (no output embeddings or "
                        f"config.vocab_size)")
    return size


def _check_args(models, tokenizers, prompts, max_new_tokens, greedy, seed):
    if not isinstance(models, Sequence) or not models:
        raise ValueError("models must be a non-empty list of Hugging Face causal LMs")
    for m, model in enumerate(models):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"models[{m}] must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(tokenizers, Sequence) or len(tokenizers) != len(models):
        n = len(tokenizers) if isinstance(tokenizers, Sequence) else type(tokenizers).__name__
        raise ValueError(f"tokenizers must hold one tokenizer per model: {len(models)} models, got {n}")
    batch = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(batch, Sequence) or not batch:
        raise ValueError("prompts must be a str or a non-empty list of str")
    for b, p in enumerate(batch):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{b}] must be a str, got {type(p).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not isinstance(greedy, bool):
        raise TypeError(f"greedy must be a bool, got {type(greedy).__name__}")
    if not greedy and seed is None:
        raise ValueError("seed: sampling (greedy=False) needs an int seed")
    return list(models), list(tokenizers), list(batch)

"""`VocabMap`: one union vocabulary for several models, keyed by the exact bytes of each token.

Two tokens of different models are the same union token when they stand for the same byte string
(`Ġhello` in a byte-level BPE, `▁hello` in a SentencePiece model and ` hello` in a tiktoken-style
list all become b" hello"). Special tokens live in their own namespace, keyed by role: every
end-of-sequence token becomes the one union `eos`, beginning-of-sequence tokens `bos`, and so on;
other specials are keyed by their literal content (`<|im_start|>`).

Union ids are assigned in order of first appearance: model 0's text tokens in id order, then its
specials, then model 1's new text tokens and new specials, and so on; so a single model's text tokens
keep their id order (greedy ties resolve as they do on the model's own logits).

Memory: 4 bytes per model id (`to_union`) + 4 bytes per union id and model (`from_union`), plus the
union byte strings.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Sequence

import numpy as np
import torch

from . import bytes_table

FORMAT = "pyfuse.VocabMap"
FORMAT_VERSION = 1

# Specials that end a sequence under any name (the tokenizer's own eos_token is always one).
EOS_CONTENTS = frozenset({
    "</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<|end|>",
    "<end_of_turn>", "<|eom_id|>", "[SEP]",
})
_ROLE_ATTRS = (("eos_token_id", "eos"), ("bos_token_id", "bos"), ("unk_token_id", "unk"),
               ("pad_token_id", "pad"))


class VocabMap:
    """Union vocabulary of `num_models` models.

    - `union_size`: number of union tokens U.
    - `to_union[m]`: int32 `[V_m]`, model id -> union id, -1 for ids that stand for nothing
      (padded embedding rows, holes, empty tokens). Many-to-one: SentencePiece `A` and `<0x41>`
      share one union id.
    - `from_union[m]`: int32 `[U]`, union id -> the model's canonical id for that string (the id
      its tokenizer emits: a regular piece rather than a byte-fallback one, then the lowest id),
      -1 when the model has no single token for it.
    - `token_bytes(u)`: the bytes of union token u (b"" for specials); `token_role(u)`: the role
      of a special (`"eos"`, `"bos"`, ..., or its content), None for text tokens.
    """

    def __init__(self, union_bytes: list[bytes], roles: dict[int, str],
                 to_union: list[torch.Tensor], from_union: list[torch.Tensor]):
        self._bytes = union_bytes
        self._roles = roles
        self._role_ids = {role: u for u, role in roles.items()}
        self._text_ids: dict[bytes, int] | None = None  # built on first text_id() call
        self.to_union = to_union
        self.from_union = from_union

    # -- queries --------------------------------------------------------------------------
    @property
    def union_size(self) -> int:
        return len(self._bytes)

    @property
    def num_models(self) -> int:
        return len(self.to_union)

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return tuple(int(t.numel()) for t in self.to_union)

    @property
    def eos_id(self) -> int | None:
        """The union end-of-sequence token, None when no model has one."""
        return self._role_ids.get("eos")

    def special_id(self, role: str) -> int | None:
        return self._role_ids.get(role)

    def text_id(self, data: bytes) -> int | None:
        """The union id of the text token with exactly these bytes, None when there is none."""
        if self._text_ids is None:
            self._text_ids = {b: u for u, b in enumerate(self._bytes) if u not in self._roles}
        return self._text_ids.get(data)

    def token_bytes(self, u: int) -> bytes:
        return self._bytes[self._check_union_id(u)]

    def token_role(self, u: int) -> str | None:
        return self._roles.get(self._check_union_id(u))

    def _check_union_id(self, u) -> int:
        if isinstance(u, bool) or not isinstance(u, numbers.Integral):
            raise TypeError(f"union id must be an int, got {type(u).__name__}")
        if not 0 <= u < self.union_size:
            raise ValueError(f"union id must be in [0, {self.union_size}), got {u}")
        return int(u)

    def __repr__(self) -> str:
        return (f"VocabMap(union_size={self.union_size}, vocab_sizes={list(self.vocab_sizes)}, "
                f"specials={sorted(self._role_ids)})")

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        lengths = np.fromiter((len(b) for b in self._bytes), dtype=np.int64, count=self.union_size)
        offsets = np.zeros(self.union_size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.frombuffer(b"".join(self._bytes), dtype=np.uint8).copy()
        torch.save({
            "format": FORMAT, "version": FORMAT_VERSION,
            "offsets": torch.from_numpy(offsets), "data": torch.from_numpy(data),
            "special_ids": list(self._roles), "special_roles": list(self._roles.values()),
            "to_union": [t.cpu() for t in self.to_union],
            "from_union": [t.cpu() for t in self.from_union],
        }, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VocabMap:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"path: {os.fspath(path)!r} is not a saved VocabMap")
        if state["version"] != FORMAT_VERSION:
            raise ValueError(f"path: VocabMap format version {state['version']} is not supported "
                             f"(this pyfuse reads version {FORMAT_VERSION})")
        offsets = state["offsets"].tolist()
        data = state["data"].numpy().tobytes()
        union_bytes = [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        roles = dict(zip(state["special_ids"], state["special_roles"]))
        return cls(union_bytes, roles, state["to_union"], state["from_union"])

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_token_bytes(cls, vocabs: Sequence[Sequence[bytes | None]], *,
                         special: Sequence[dict[int, str] | None] | None = None,
                         fallback: Sequence[Sequence[int] | None] | None = None,
                         model_vocab_sizes: Sequence[int] | None = None) -> VocabMap:
        """Build from plain lists, one `bytes` (or None: the id stands for nothing) per id and model,
        for tokenizers that are not Hugging Face ones (tiktoken, raw SentencePiece).

        `special[m]`: `{id: role}` for model m's special tokens (their bytes are ignored; use role
        "eos" for every end-of-sequence token). `fallback[m]`: ids to use only when the model has no
        other id with the same bytes (byte-fallback pieces). `model_vocab_sizes[m]` >= len(vocabs[m])
        pads `to_union[m]` with -1 (embedding rows past the tokenizer).
        """
        if not isinstance(vocabs, Sequence) or isinstance(vocabs, (bytes, str)) or not vocabs:
            raise ValueError("vocabs must be a non-empty list with one token list per model")
        n_models = len(vocabs)
        special = _per_model("special", special, n_models)
        fallback = _per_model("fallback", fallback, n_models)
        models = []
        for m, entries in enumerate(vocabs):
            if not isinstance(entries, Sequence) or isinstance(entries, (bytes, str)):
                raise TypeError(f"vocabs[{m}] must be a list of bytes or None, "
                                f"got {type(entries).__name__}")
            for i, b in enumerate(entries):
                if b is not None and not isinstance(b, bytes):
                    raise TypeError(f"vocabs[{m}][{i}] must be bytes or None, got {type(b).__name__}")
            models.append((entries, _check_special(m, special[m], len(entries)),
                           _check_fallback(m, fallback[m], len(entries))))
        sizes = _check_vocab_sizes(model_vocab_sizes, [len(e) for e in vocabs])
        return _build(models, sizes)

    @classmethod
    def from_tokenizers(cls, tokenizers: Sequence, *,
                        model_vocab_sizes: Sequence[int] | None = None) -> VocabMap:
        """Build from Hugging Face tokenizers (fast or slow).

        Token bytes: byte-level BPE through GPT-2's byte table, SentencePiece `▁` as a space and
        `<0xNN>` byte-fallback pieces as that byte, WordPiece `##` continuations without the prefix
        and word starts with a leading space, non-special added tokens as their UTF-8 text.
        Specials (`all_special_ids` and added tokens marked special) are keyed by role.
        `model_vocab_sizes[m]` (the model's logits width, e.g. `config.vocab_size`) must be at least
        `len(tokenizers[m])`; the extra ids map to -1.
        """
        if not isinstance(tokenizers, Sequence) or not tokenizers:
            raise ValueError("tokenizers must be a non-empty list of Hugging Face tokenizers")
        for m, tok in enumerate(tokenizers):
            if not all(hasattr(tok, a) for a in ("get_vocab", "convert_ids_to_tokens", "__len__")):
                raise TypeError(f"tokenizers[{m}] must be a Hugging Face tokenizer, "
                                f"got {type(tok).__name__}")
        models = [_tokenizer_entries(tok) for tok in tokenizers]
        sizes = _check_vocab_sizes(model_vocab_sizes, [len(tok) for tok in tokenizers])
        return _build(models, sizes)


def _per_model(name, value, n_models):
    if value is None:
        return [None] * n_models
    if not isinstance(value, Sequence) or len(value) != n_models:
        raise ValueError(f"{name} must be None or a list with one entry per model ({n_models})")
    return list(value)


def _check_id(name, i, n):
    if isinstance(i, bool) or not isinstance(i, numbers.Integral):
        raise TypeError(f"{name} must hold int token ids, got {type(i).__name__}")
    if not 0 <= i < n:
        raise ValueError(f"{name} holds token id {i}, outside [0, {n})")
    return int(i)


def _check_special(m, special, n):
    if special is None:
        return {}
    if not isinstance(special, dict):
        raise TypeError(f"special[{m}] must be a dict {{id: role}}, got {type(special).__name__}")
    out = {}
    for i, role in special.items():
        if not isinstance(role, str) or not role:
            raise ValueError(f"special[{m}][{i}] must be a non-empty role string, got {role!r}")
        out[_check_id(f"special[{m}]", i, n)] = role
    return out


def _check_fallback(m, fallback, n):
    if fallback is None:
        return frozenset()
    return frozenset(_check_id(f"fallback[{m}]", i, n) for i in fallback)


def _check_vocab_sizes(model_vocab_sizes, lengths):
    if model_vocab_sizes is None:
        return lengths
    if not isinstance(model_vocab_sizes, Sequence) or len(model_vocab_sizes) != len(lengths):
        raise ValueError(f"model_vocab_sizes must have one entry per model ({len(lengths)}), "
                         f"got {model_vocab_sizes!r}")
    sizes = []
    for m, (v, n) in enumerate(zip(model_vocab_sizes, lengths)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"model_vocab_sizes[{m}] must be an int, got {type(v).__name__}")
        if v < n:
            raise ValueError(f"model_vocab_sizes[{m}] = {v} is smaller than the tokenizer's "
                             f"{n} tokens")
        sizes.append(int(v))
    return sizes


def _build(models, vocab_sizes) -> VocabMap:
    """models[m] = (entries: bytes|None per id, specials: {id: role}, fallback: set of ids)."""
    text_ids: dict[bytes, int] = {}
    role_ids: dict[str, int] = {}
    union_bytes: list[bytes] = []
    forward = []
    for (entries, specials, _), size in zip(models, vocab_sizes):
        fwd = [-1] * size
        get = text_ids.get
        for i, b in enumerate(entries):
            if b and i not in specials:
                u = get(b)
                if u is None:
                    u = text_ids[b] = len(union_bytes)
                    union_bytes.append(b)
                fwd[i] = u
        for i in sorted(specials):
            u = role_ids.get(specials[i])
            if u is None:
                u = role_ids[specials[i]] = len(union_bytes)
                union_bytes.append(b"")
            fwd[i] = u
        forward.append(np.array(fwd, dtype=np.int32))
    from_union = [torch.from_numpy(_canonical(fwd, fallback, len(union_bytes)))
                  for fwd, (_, _, fallback) in zip(forward, models)]
    roles = {u: role for role, u in role_ids.items()}
    return VocabMap(union_bytes, roles, [torch.from_numpy(f) for f in forward], from_union)


def _canonical(fwd: np.ndarray, fallback, union_size: int) -> np.ndarray:
    """from_union of one model: per union id the lowest id that is not a fallback piece, else the
    lowest fallback id, else -1."""
    ids = np.nonzero(fwd >= 0)[0]
    keys = fwd[ids]
    is_fallback = np.zeros(len(fwd), dtype=bool)
    if fallback:
        is_fallback[np.fromiter(fallback, np.int64, len(fallback))] = True
    order = np.lexsort((ids, is_fallback[ids], keys))  # by union id, then regular first, then id
    keys, ids = keys[order], ids[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    back = np.full(union_size, -1, dtype=np.int32)
    back[keys[first]] = ids[first]
    return back


# -- Hugging Face tokenizers ------------------------------------------------------------------

def _tokenizer_entries(tok):
    """(bytes|None per id, {id: role}, byte-fallback ids) of a Hugging Face tokenizer."""
    n = len(tok)
    tokens: list[str | None] = [None] * n
    for s, i in tok.get_vocab().items():
        if 0 <= i < n:
            tokens[i] = s
    to_bytes, byte_fallback = _spelling(tok)
    entries = [None if s is None else to_bytes(s) for s in tokens]
    fallback = set()
    if byte_fallback:
        for i, s in enumerate(tokens):
            value = bytes_table.byte_piece_value(s) if s and s.startswith("<0x") else None
            if value is not None:
                entries[i] = bytes([value])
                fallback.add(i)
    added = getattr(tok, "added_tokens_decoder", {})
    for i in added:  # added tokens are stored as plain text, outside the model's spelling
        if 0 <= i < n and tokens[i] is not None:
            entries[i] = tokens[i].encode("utf-8")
    special_ids = {i for i in tok.all_special_ids if 0 <= i < n}
    special_ids |= {i for i, a in added.items() if getattr(a, "special", False) and 0 <= i < n}
    return entries, _special_roles(tok, special_ids, tokens), fallback


def _special_roles(tok, special_ids, tokens):
    roles = {}
    for attr, role in _ROLE_ATTRS:
        i = getattr(tok, attr, None)
        if isinstance(i, int) and i in special_ids and i not in roles:
            roles[i] = role
    for i in sorted(special_ids):
        if i not in roles and tokens[i] is not None:
            roles[i] = "eos" if tokens[i] in EOS_CONTENTS else tokens[i]
    return roles


def _component_types(component):
    """All `type` names in a tokenizers component (decoder, normalizer...) and its raw state."""
    if component is None:
        return set(), ""
    state = component.__getstate__()
    state = state.decode("utf-8") if isinstance(state, bytes) else str(state)
    types = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                types.add(node["type"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(state))
    return types, state


def _spelling(tok):
    """(token string -> bytes function, whether `<0xNN>` pieces are byte fallback) of a tokenizer."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        types, states = set(), ""
        for comp in (backend.decoder, backend.pre_tokenizer, backend.normalizer):
            t, s = _component_types(comp)
            types |= t
            states += s
        if "ByteLevel" in types:
            return bytes_table.byte_level_bytes, False
        if type(backend.model).__name__ == "WordPiece":
            prefix = backend.model.continuing_subword_prefix
            return (lambda s: bytes_table.wordpiece_bytes(s, prefix)), False
        if "Metaspace" in types or bytes_table.SPIECE_SPACE in states:
            return bytes_table.sentencepiece_bytes, ("ByteFallback" in types
                                                     or bool(getattr(backend.model, "byte_fallback", False)))
        return _utf8, False
    # Slow (Python) tokenizers.
    if isinstance(getattr(tok, "byte_decoder", None), dict):
        trans = bytes_table.byte_level_translation(tok.byte_decoder)
        return (lambda s: bytes_table.byte_level_bytes(s, trans)), False
    sp = getattr(tok, "sp_model", None)
    if sp is not None:
        return bytes_table.sentencepiece_bytes, bool(sp.IsByte(sp.PieceToId("<0x00>")))
    wordpiece = getattr(tok, "wordpiece_tokenizer", None)
    if wordpiece is not None:
        prefix = getattr(wordpiece, "continuing_subword_prefix", "##")
        return (lambda s: bytes_table.wordpiece_bytes(s, prefix)), False
    return _utf8, False


def _utf8(s: str) -> bytes:
    return s.encode("utf-8")

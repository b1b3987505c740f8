"""Token string -> exact bytes, for the token spellings Hugging Face vocabularies use.

A vocabulary stores tokens as strings, but what a token stands for is a byte string:
- byte-level BPE (GPT-2, Llama-3, Qwen) spells every byte as one printable character of GPT-2's
  `bytes_to_unicode` table (`Ġ` = space, `Ċ` = newline, multi-byte UTF-8 split across tokens);
- SentencePiece spells a space as `▁` and an unknown byte as the piece `<0xNN>` (byte fallback);
- WordPiece marks word continuations with a prefix (`##`) and separates words with a space.
`decode([id])` is not a substitute: it turns partial UTF-8 into U+FFFD and strips spaces.
"""

import re

SPIECE_SPACE = "\u2581"  # ▁
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (bytes that print as themselves keep
    their code point; the 68 others are shifted to 256 + n, in byte order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _make_translation(char_to_byte: dict[str, int]) -> dict[int, str]:
    # str.translate maps every table character to the latin-1 character of its byte, so that
    # `.encode("latin-1")` yields the bytes in one C-level pass. Characters below 256 that are
    # not in the table (a raw space, say) become U+FFFF so that the encode fails for them too.
    trans = {code: "\uffff" for code in range(256)}
    for ch, b in char_to_byte.items():
        trans[ord(ch)] = chr(b)
    return trans


_GPT2_TRANSLATION = _make_translation({c: b for b, c in gpt2_byte_to_unicode().items()})


def byte_level_translation(byte_decoder: dict[str, int] | None = None) -> dict[int, str]:
    """Translation table for `byte_level_bytes`; `byte_decoder` is a slow tokenizer's own
    character -> byte dict (defaults to GPT-2's table)."""
    return _GPT2_TRANSLATION if byte_decoder is None else _make_translation(byte_decoder)


def byte_level_bytes(token: str, translation: dict[int, str] = _GPT2_TRANSLATION) -> bytes:
    """Bytes of a byte-level BPE token; a string outside the table (an added token stored as
    plain text) is taken as UTF-8 text."""
    try:
        return token.translate(translation).encode("latin-1")
    except UnicodeEncodeError:
        return token.encode("utf-8")


def byte_piece_value(token: str) -> int | None:
    """The byte of a SentencePiece byte-fallback piece `<0xNN>`, else None."""
    match = _BYTE_PIECE.fullmatch(token)
    return int(match.group(1), 16) if match else None


def sentencepiece_bytes(token: str) -> bytes:
    """Bytes of a SentencePiece piece, `▁` being a space (byte-fallback pieces `<0xNN>` are
    handled by id, see `byte_piece_value`)."""
    return token.replace(SPIECE_SPACE, " ").encode("utf-8")


def wordpiece_bytes(token: str, prefix: str) -> bytes:
    """Bytes of a WordPiece token: a continuation drops its prefix, a word start gets the space
    that separates it from the previous word (as decode writes it, before clean-up)."""
    if prefix and token.startswith(prefix) and len(token) > len(prefix):
        return token[len(prefix):].encode("utf-8")
    return b" " + token.encode("utf-8")

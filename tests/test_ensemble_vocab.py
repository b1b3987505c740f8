"""VocabMap: byte-exact union vocabulary over tokenizers trained here (no Hub downloads)."""
from __future__ import annotations

import io
import json

import pytest
import torch

from pyfuse.ensemble import VocabMap
from pyfuse.ensemble import bytes_table

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

# Shared training text: accents, CJK and an emoji make byte-level BPE split characters across tokens.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Héllo wörld, naïve café!",
    "Ensembling language models with different vocabularies: 日本語のテキスト 😀 works.",
    "A model keeps its own cache; the other model re-tokenises the text it cannot spell.",
] * 10
# Texts for round trips; 🦀 and ß never occur in CORPUS (byte fallback, unknown characters).
TEXTS = ["Héllo wörld, the fox!", "日本語 😀 cache", "crab 🦀 straße", "two  spaces\nnewline"]


def train_bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 / Llama-3 style)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=360, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])


def train_unigram() -> PreTrainedTokenizerFast:
    """SentencePiece-style Unigram with `▁` and 256 `<0xNN>` byte-fallback pieces (Llama-2 style)."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False))
    trained = [tuple(p) for p in json.loads(tok.model.__getstate__())["vocab"]]
    # The trainer's piece order and the last bits of its scores vary from run to run (the same pieces): sorted
    # and rounded, every run builds the same tokenizer (the generate tests' random models depend on its ids).
    learned = sorted(((piece, round(score, 6)) for piece, score in trained[3:]), key=lambda p: (-p[1], p[0]))
    pieces = trained[:3] + [(f"<0x{b:02X}>", -20.0) for b in range(256)] + learned
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def train_wordpiece() -> PreTrainedTokenizerFast:
    """BERT-style WordPiece (lower-cases: not byte-faithful)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                                   pad_token="[PAD]", cls_token="[CLS]")


def train_slow_sentencepiece(tmp_dir):
    """A slow (sentencepiece-library) tokenizer with byte fallback."""
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=330,
                                   model_type="unigram", byte_fallback=True, pad_id=3, minloglevel=2,
                                   hard_vocab_limit=False)
    path = tmp_dir / "sp.model"
    path.write_bytes(buf.getvalue())
    return transformers.BertGenerationTokenizer(str(path))


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    bpe = train_bpe()
    bpe.backend_tokenizer.model.save(str(tmp))
    slow_bpe = transformers.ClvpTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"))
    wp = train_wordpiece()
    (tmp / "vocab.txt").write_text("\n".join(sorted(wp.get_vocab(), key=wp.get_vocab().get)) + "\n")
    slow_wp = transformers.BertTokenizerLegacy(str(tmp / "vocab.txt"))
    return {"bpe": bpe, "unigram": train_unigram(), "wordpiece": wp,
            "slow_sp": train_slow_sentencepiece(tmp), "slow_bpe": slow_bpe, "slow_wordpiece": slow_wp}


@pytest.fixture(scope="module")
def vmap(toks):
    return VocabMap.from_tokenizers([toks[k] for k in ("bpe", "unigram", "wordpiece", "slow_sp")])


def ids_bytes(vm, m, ids):
    return b"".join(vm.token_bytes(int(vm.to_union[m][i])) for i in ids)


def test_gpt2_byte_table_matches_transformers():
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    assert bytes_table.gpt2_byte_to_unicode() == bytes_to_unicode()
    assert set(bytes_table.gpt2_byte_to_unicode().values()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_shapes_and_contract(vmap, toks):
    U = vmap.union_size
    assert vmap.num_models == 4
    for m, key in enumerate(("bpe", "unigram", "wordpiece", "slow_sp")):
        fwd, back = vmap.to_union[m], vmap.from_union[m]
        assert fwd.dtype == torch.int32 and fwd.shape == (len(toks[key]),)
        assert back.dtype == torch.int32 and back.shape == (U,)
        assert int(fwd.min()) >= -1 and int(fwd.max()) < U
        assert int(back.min()) >= -1 and int(back.max()) < len(toks[key])


def test_round_trip_canonical(vmap, toks):
    for m, key in enumerate(("bpe", "unigram", "wordpiece", "slow_sp")):
        vocab = {i: s for s, i in toks[key].get_vocab().items()}
        fwd, back = vmap.to_union[m].tolist(), vmap.from_union[m].tolist()
        gave_way = 0
        for t, u in enumerate(fwd):
            if u < 0:
                continue
            c = back[u]
            if c != t:  # only byte-fallback pieces may give way, to the regular piece of their byte
                gave_way += 1
                assert bytes_table.byte_piece_value(vocab[t]) is not None, (key, vocab[t])
                assert fwd[c] == u and bytes_table.byte_piece_value(vocab[c]) is None
        for u, c in enumerate(back):
            assert c == -1 or fwd[c] == u
        # SentencePiece: `<0x61>` and `a` are one union token (many-to-one), `a` is canonical.
        assert (gave_way > 0) == (key in ("unigram", "slow_sp"))


def test_bytes_equal_decode_byte_level(vmap, toks):
    bpe = toks["bpe"]
    partial = 0
    for i in range(len(bpe)):
        u = int(vmap.to_union[0][i])
        if vmap.token_role(u) is not None:
            continue
        data = vmap.token_bytes(u)
        try:
            assert data.decode("utf-8") == bpe.decode([i])
        except UnicodeDecodeError:  # a UTF-8 character split across tokens: decode shows U+FFFD
            partial += 1
            assert "\ufffd" in bpe.decode([i])
    assert partial > 0  # the corpus has multi-byte characters the trainer split
    for text in TEXTS:
        ids = bpe(text, add_special_tokens=False)["input_ids"]
        assert ids_bytes(vmap, 0, ids) == text.encode("utf-8")


def test_multibyte_character_split_across_tokens(vmap, toks):
    for m, key in ((0, "bpe"), (1, "unigram"), (3, "slow_sp")):
        ids = toks[key]("🦀", add_special_tokens=False)["input_ids"]
        pieces = [ids_bytes(vmap, m, [i]) for i in ids]
        assert len([p for p in pieces if p.strip()]) > 1, (key, pieces)  # really split
        assert b"".join(pieces).strip() == "🦀".encode("utf-8")


@pytest.mark.parametrize("m,key", [(1, "unigram"), (3, "slow_sp")])
def test_sentencepiece_bytes(vmap, toks, m, key):
    tok = toks[key]
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        got = ids_bytes(vmap, m, ids).decode("utf-8")
        # `▁` is a space (the dummy prefix gives one in front); the slow tokenizer's normaliser
        # folds runs of spaces and the newline, so compare modulo whitespace there.
        assert got.startswith(" ")
        if key == "unigram":
            assert got == " " + text
            assert tok.decode(ids) == text  # byte-faithful decode agrees
        else:
            assert got.split() == text.split()
    pieces = [i for s, i in tok.get_vocab().items() if bytes_table.byte_piece_value(s) is not None]
    assert len(pieces) == 256
    for s, i in tok.get_vocab().items():
        value = bytes_table.byte_piece_value(s)
        if value is not None:
            assert vmap.token_bytes(int(vmap.to_union[m][i])) == bytes([value])


def test_wordpiece_bytes(vmap, toks):
    wp = toks["wordpiece"]
    ids = wp("The quick brown fox", add_special_tokens=False)["input_ids"]
    tokens = wp.convert_ids_to_tokens(ids)
    expected = b"".join(t[2:].encode() if t.startswith("##") else b" " + t.encode() for t in tokens)
    assert ids_bytes(vmap, 2, ids) == expected == b" the quick brown fox"


def test_specials_by_role(vmap, toks):
    eos = vmap.eos_id
    assert eos is not None and vmap.token_role(eos) == "eos" and vmap.token_bytes(eos) == b""
    for m, (key, content) in enumerate((("bpe", "<|endoftext|>"), ("unigram", "</s>"),
                                        ("wordpiece", "[SEP]"), ("slow_sp", "</s>"))):
        assert int(vmap.to_union[m][toks[key].convert_tokens_to_ids(content)]) == eos
        assert int(vmap.from_union[m][eos]) == toks[key].convert_tokens_to_ids(content)
    bos = vmap.special_id("bos")
    assert int(vmap.to_union[1][toks["unigram"].bos_token_id]) == bos
    assert int(vmap.to_union[3][toks["slow_sp"].bos_token_id]) == bos
    assert int(vmap.from_union[0][bos]) == -1  # the BPE has no bos
    # Other specials are keyed by content, apart from text with the same spelling.
    im = vmap.special_id("<|im_start|>")
    assert im is not None and int(vmap.to_union[0][toks["bpe"].convert_tokens_to_ids("<|im_start|>")]) == im
    assert vmap.text_id(b"</s>") is None


def test_same_tokenizer_twice(toks):
    bpe = toks["bpe"]
    vm = VocabMap.from_tokenizers([bpe, bpe])
    assert torch.equal(vm.to_union[0], vm.to_union[1])
    assert torch.equal(vm.from_union[0], vm.from_union[1])
    assert vm.union_size == len(bpe)  # byte-level BPE: every id its own string
    assert bool((vm.from_union[0] >= 0).all())


def test_slow_and_fast_byte_level_agree(toks):
    """The same BPE vocabulary through the fast (GPT-2 table) and slow (tokenizer's own byte_decoder)
    paths gives the same map."""
    vm = VocabMap.from_tokenizers([toks["bpe"], toks["slow_bpe"]])
    fast_vocab, slow_vocab = toks["bpe"].get_vocab(), toks["slow_bpe"].get_vocab()
    specials = set(toks["bpe"].all_special_tokens) | set(toks["slow_bpe"].all_special_tokens)
    compared = 0
    for s, i in slow_vocab.items():
        if s in fast_vocab and s not in specials and i < len(toks["slow_bpe"]):
            compared += 1
            assert int(vm.to_union[1][i]) == int(vm.to_union[0][fast_vocab[s]]), s
    assert compared >= len(fast_vocab) - len(specials)


def test_slow_wordpiece_matches_fast(toks):
    vm = VocabMap.from_tokenizers([toks["wordpiece"], toks["slow_wordpiece"]])
    n = len(toks["wordpiece"])  # the slow tokenizer adds its default [MASK] after the vocabulary
    assert torch.equal(vm.to_union[0], vm.to_union[1][:n])


def test_padded_model_vocab(toks):
    bpe, uni = toks["bpe"], toks["unigram"]
    vm = VocabMap.from_tokenizers([bpe, uni], model_vocab_sizes=[len(bpe) + 7, len(uni)])
    assert vm.to_union[0].shape == (len(bpe) + 7,)
    assert bool((vm.to_union[0][len(bpe):] == -1).all())
    assert bool((vm.from_union[0] < len(bpe)).all())


def test_save_load_round_trip(vmap, tmp_path):
    path = tmp_path / "vmap.pt"
    vmap.save(path)
    back = VocabMap.load(path)
    assert back.union_size == vmap.union_size and back.num_models == vmap.num_models
    for a, b in zip(vmap.to_union + vmap.from_union, back.to_union + back.from_union):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for u in range(vmap.union_size):
        assert back.token_bytes(u) == vmap.token_bytes(u)
        assert back.token_role(u) == vmap.token_role(u)
    assert back.eos_id == vmap.eos_id


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"format": "something else"}, path)
    with pytest.raises(ValueError, match="not a saved VocabMap"):
        VocabMap.load(path)


def test_from_token_bytes():
    a = [b"a", b"b", b" a", None, b"", b"eos-text", b"a"]
    b_ = [b"b", b"<end>", b"c", b"a", b"\xe6", b"\x97"]
    vm = VocabMap.from_token_bytes([a, b_], special=[{5: "eos"}, {1: "eos"}], fallback=[[0], None],
                                   model_vocab_sizes=[8, 6])
    # Union in order of first appearance: a, b, " a", eos, then model 1's new c, \xe6, \x97.
    assert [vm.token_bytes(u) for u in range(vm.union_size)] == [
        b"a", b"b", b" a", b"", b"c", b"\xe6", b"\x97"]
    assert vm.to_union[0].tolist() == [0, 1, 2, -1, -1, 3, 0, -1]
    assert vm.from_union[0].tolist() == [6, 1, 2, 5, -1, -1, -1]  # id 0 is a fallback: 6 wins
    assert vm.to_union[1].tolist() == [1, 3, 4, 0, 5, 6]
    assert vm.from_union[1].tolist() == [3, 0, -1, 1, 2, 4, 5]
    assert vm.eos_id == 3 and vm.token_role(3) == "eos" and vm.token_role(0) is None
    assert vm.text_id(b"\xe6") == 5 and vm.text_id(b"zz") is None


def test_from_token_bytes_matches_from_tokenizers(vmap, toks):
    """A tokenizer's bytes handed over as plain lists give the same map."""
    uni = toks["unigram"]
    vocab = [vmap.token_bytes(int(u)) if u >= 0 else None for u in vmap.to_union[1].tolist()]
    roles = {i: vmap.token_role(int(vmap.to_union[1][i])) for i in uni.all_special_ids}
    pieces = [i for s, i in uni.get_vocab().items() if bytes_table.byte_piece_value(s) is not None]
    direct = VocabMap.from_tokenizers([uni])
    plain = VocabMap.from_token_bytes([vocab], special=[roles], fallback=[pieces])
    assert torch.equal(direct.to_union[0], plain.to_union[0])
    assert torch.equal(direct.from_union[0], plain.from_union[0])


def test_bad_input(toks):
    bpe, uni = toks["bpe"], toks["unigram"]
    with pytest.raises(ValueError, match="model_vocab_sizes must have one entry per model"):
        VocabMap.from_tokenizers([bpe, uni], model_vocab_sizes=[len(bpe)])
    with pytest.raises(ValueError, match=r"model_vocab_sizes\[1\] = 5 is smaller"):
        VocabMap.from_tokenizers([bpe, uni], model_vocab_sizes=[len(bpe), 5])
    with pytest.raises(TypeError, match=r"model_vocab_sizes\[0\] must be an int"):
        VocabMap.from_tokenizers([bpe], model_vocab_sizes=[1e6])
    with pytest.raises(ValueError, match="tokenizers must be a non-empty list"):
        VocabMap.from_tokenizers([])
    with pytest.raises(TypeError, match=r"tokenizers\[1\] must be a Hugging Face tokenizer"):
        VocabMap.from_tokenizers([bpe, "gpt2"])
    with pytest.raises(TypeError, match=r"vocabs\[0\]\[1\] must be bytes or None"):
        VocabMap.from_token_bytes([[b"a", "b"]])
    with pytest.raises(ValueError, match=r"special\[0\] holds token id 3, outside \[0, 2\)"):
        VocabMap.from_token_bytes([[b"a", b"b"]], special=[{3: "eos"}])
    with pytest.raises(ValueError, match=r"special\[0\]\[0\] must be a non-empty role"):
        VocabMap.from_token_bytes([[b"a", b"b"]], special=[{0: ""}])
    with pytest.raises(ValueError, match="special must be None or a list with one entry per model"):
        VocabMap.from_token_bytes([[b"a"], [b"b"]], special=[{0: "eos"}])
    with pytest.raises(ValueError, match="vocabs must be a non-empty list"):
        VocabMap.from_token_bytes([])
    vm = VocabMap.from_token_bytes([[b"a"]])
    with pytest.raises(ValueError, match=r"union id must be in \[0, 1\)"):
        vm.token_bytes(1)
    with pytest.raises(TypeError, match="union id must be an int"):
        vm.token_bytes(0.0)

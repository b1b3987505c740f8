"""pyfuse.ensemble.generate with tiny random Llama models and tokenizers trained here."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

from pyfuse.ensemble import NextToken, VocabMap, generate, union_topk

# The module (the package attribute `generate` is the function).
gen_mod = importlib.import_module("pyfuse.ensemble.generate")

transformers = pytest.importorskip("transformers")
from test_ensemble_vocab import train_bpe, train_unigram, train_wordpiece  # noqa: E402  (tokenizers trained locally)

PROMPTS = ["The quick brown fox", "Héllo", "Ensembling language models with different vocabularies:"]


def tiny_llama(tok, seed: int, extra_rows: int = 0):
    """hidden 32, 2 layers; a large init spreads the logits so greedy choices are far from ties."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok) + extra_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup():
    bpe, uni = train_bpe(), train_unigram()
    # The BPE model has padded embedding rows (ids past the tokenizer), as real checkpoints do.
    return {"toks": [bpe, uni], "models": [tiny_llama(bpe, 0, extra_rows=5), tiny_llama(uni, 1)]}


def hf_greedy(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    return new[:-1] if new and new[-1] == tok.eos_token_id else new


def end_after(model, tok, prompt: str, step: int):
    """A copy of `model` where EOS wins wherever greedy decoding of `prompt` picks its token at `step`
    (EOS gets that token's output row, doubled): rows that stop at different steps."""
    x = hf_greedy(model, tok, prompt, step + 1)[step]
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 2 * model.lm_head.weight[x]
    return model


def token_bytes(vmap, m, ids) -> bytes:
    return b"".join(vmap.token_bytes(int(vmap.to_union[m][i])) for i in ids)


class Recorder:
    """Wraps a model's forward: records input ids, positions, attention mask, whether a cache came in
    and the next-token logits. `force_eos=(call, row, eos_id)` makes that row emit EOS at that call."""

    def __init__(self, model, monkeypatch, force_eos=None):
        self.calls = []
        forward = model.forward

        def wrapped(*args, **kwargs):
            out = forward(*args, **kwargs)
            if force_eos is not None and force_eos[0] == len(self.calls):
                out.logits[force_eos[1], -1, force_eos[2]] = 1e4
            self.calls.append({"ids": kwargs["input_ids"].clone(), "mask": kwargs["attention_mask"].clone(),
                               "pos": kwargs["position_ids"].clone(), "logits": out.logits[:, -1].clone(),
                               "cached": kwargs.get("past_key_values") is not None})
            return out

        monkeypatch.setattr(model, "forward", wrapped)

    def live_context(self, row: int) -> list[int]:
        """The row's tokens the last call attended to (cache columns are rewritten when reused)."""
        cols = {}
        for c in self.calls:
            S = c["mask"].shape[1] - c["ids"].shape[1]
            for j, t in enumerate(c["ids"][row].tolist()):
                cols[S + j] = t
        mask = self.calls[-1]["mask"][row].tolist()
        return [cols[s] for s, on in enumerate(mask) if on]

    def check_positions(self):
        """Every new token sits at the position a compact (cropped, unpadded) cache would give it."""
        for c in self.calls:
            n = c["ids"].shape[1]
            live_before = c["mask"].cumsum(dim=1) - c["mask"]
            new = c["mask"][:, -n:] == 1
            assert torch.equal(c["pos"][new], live_before[:, -n:][new])


@pytest.fixture
def chosen(monkeypatch):
    """Records what the ensembling op returns each step."""
    steps = []
    real = gen_mod.next_token

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        steps.append((out.union_ids.tolist(), out.model_ids.tolist()))
        return out

    monkeypatch.setattr(gen_mod, "next_token", wrapped)
    return steps


def test_single_model_equals_hf_greedy(setup, monkeypatch):
    tok = setup["toks"][0]
    model = end_after(setup["models"][0], tok, PROMPTS[1], 4)
    vmap = VocabMap.from_tokenizers([tok], model_vocab_sizes=[model.config.vocab_size])
    n = 12
    expected = [hf_greedy(model, tok, p, n) for p in PROMPTS]
    assert min(map(len, expected)) < n == max(map(len, expected))  # rows stop at EOS at different steps
    rec = Recorder(model, monkeypatch)
    for p, want in zip(PROMPTS, expected):
        rec.calls.clear()
        text = generate([model], [tok], p, max_new_tokens=n, vmap=vmap)
        fed = [c["ids"][0].tolist() for c in rec.calls[1:]]
        assert all(len(f) == 1 for f in fed)  # one token per step on the cache
        assert [f[0] for f in fed] == want[:len(fed)]  # token for token (the last one is never fed)
        assert text == token_bytes(vmap, 0, want).decode("utf-8", "replace")
    # The same prompts as one left-padded batch give the same texts.
    assert generate([model], [tok], PROMPTS, max_new_tokens=n, vmap=vmap) == [
        token_bytes(vmap, 0, w).decode("utf-8", "replace") for w in expected]


def test_two_models_batched_keep_caches(setup, monkeypatch, chosen):
    models, toks = setup["models"], setup["toks"]
    vmap = VocabMap.from_tokenizers(toks, model_vocab_sizes=[m.config.vocab_size for m in models])
    n, stop_row, stop_step = 16, 1, 5
    recs = [Recorder(m, monkeypatch, force_eos=(stop_step, stop_row, tok.eos_token_id))
            for m, tok in zip(models, toks)]
    texts = generate(models, toks, PROMPTS, max_new_tokens=n, vmap=vmap)
    eos = vmap.eos_id
    assert len(texts) == len(PROMPTS) and len(chosen) == n
    assert [u[stop_row] for u, _ in chosen[:stop_step + 1]].index(eos) == stop_step
    assert all(u[b] != eos for u, _ in chosen for b in (0, 2))

    # MEASURED: tokens each model processes per step.
    active = [True] * len(PROMPTS)
    normal_steps = resync_steps = 0
    for t, (union_ids, model_ids) in enumerate(chosen[:-1]):
        active = [a and u != eos for a, u in zip(active, union_ids)]
        rows = [b for b in range(len(PROMPTS)) if active[b]]
        for m, rec in enumerate(recs):
            call = rec.calls[t + 1]
            assert call["cached"]
            width = call["ids"].shape[1]
            for b in range(len(PROMPTS)):
                if not active[b]:  # a finished row is fed nothing
                    assert int(call["mask"][b, -width:].sum()) == 0
            if all(model_ids[b][m] >= 0 for b in rows):
                # Normal step: every row got the model's own id, alone, on the kept cache.
                normal_steps += 1
                assert width == 1
                assert [call["ids"][b, 0].item() for b in rows] == [model_ids[b][m] for b in rows]
            else:
                # Re-tokenised: only the look-behind window is fed again, never the whole context.
                resync_steps += 1
                assert width <= gen_mod.LOOKBEHIND + 8
        # Cache length grows by what was fed (crops only remove dead tail columns): no reset.
        for rec in recs:
            before, after = rec.calls[t]["mask"].shape[1], rec.calls[t + 1]["mask"].shape[1]
            assert before - gen_mod.LOOKBEHIND - 8 <= after <= before + rec.calls[t + 1]["ids"].shape[1]
    assert normal_steps > 0 and resync_steps > 0

    # Texts are the chosen tokens' bytes; each model's context is exactly its prompt + the text chosen
    # before the last step, in its own tokens, at the right positions, and its cached logits equal a
    # fresh forward over that context.
    for b, prompt in enumerate(PROMPTS):
        picked = []
        for union_ids, _ in chosen:
            if union_ids[b] == eos:
                break
            picked.append(union_ids[b])
        assert texts[b] == b"".join(vmap.token_bytes(u) for u in picked).decode("utf-8", "replace")
    rows = {b: b"".join(vmap.token_bytes(u[b]) for u, _ in chosen[:-1]) for b in (0, 2)}
    check_contexts(recs, models, toks, vmap, PROMPTS, rows)


def check_contexts(recs, models, toks, vmap, prompts, before_last: dict[int, bytes]):
    """For each row b in `before_last`: each model's context at its last call is exactly its prompt +
    before_last[b], in its own tokens, at the positions of a compact cache, and the logits computed on
    the kept cache equal a fresh forward over that context."""
    for m, (rec, tok, model) in enumerate(zip(recs, toks, models)):
        rec.check_positions()
        for b, text in before_last.items():
            prompt_ids = tok(prompts[b])["input_ids"]
            context = rec.live_context(b)
            assert context[:len(prompt_ids)] == prompt_ids
            assert token_bytes(vmap, m, context[len(prompt_ids):]) == text
            with torch.no_grad():  # the class's forward: the recorder wraps the instance's
                fresh = type(model).forward(model, input_ids=torch.tensor([context])).logits[0, -1]
            torch.testing.assert_close(rec.calls[-1]["logits"][b], fresh, rtol=1e-4, atol=1e-4)


def test_resync_crops_to_common_prefix(setup, monkeypatch):
    """Scripted choices: row 0 spells a text in the Unigram model's pieces, row 1 in the BPE's, so each
    model must re-tokenise (and drop cached tokens) on one row while keeping the other's cache."""
    models, toks = setup["models"], setup["toks"]
    vmap = VocabMap.from_tokenizers(toks, model_vocab_sizes=[m.config.vocab_size for m in models])
    scripts = []
    # Both tokenizers re-merge pieces of the other one here; the text starts inside a word, where a
    # SentencePiece tokenizer encoding it alone would add a dummy-prefix space.
    text = "llo, the other 日本語 böse theke"
    for m in (1, 0):
        ids = toks[m](text, add_special_tokens=False)["input_ids"]
        script = [int(vmap.to_union[m][i]) for i in ids]
        scripts.append(script[1:] if vmap.token_bytes(script[0]) == b" " else script)
    n = min(map(len, scripts))

    def scripted(logits, vmap_, weights, *, stream, **kwargs):
        return NextToken(torch.tensor([s[stream] for s in scripts]), None, None)

    monkeypatch.setattr(gen_mod, "next_token", scripted)
    recs = [Recorder(m, monkeypatch) for m in models]
    prompts = PROMPTS[:2]
    texts = generate(models, toks, prompts, max_new_tokens=n, vmap=vmap)
    assert texts == [b"".join(vmap.token_bytes(u) for u in s[:n]).decode() for s in scripts]
    check_contexts(recs, models, toks, vmap, prompts,
                   {b: b"".join(vmap.token_bytes(u) for u in s[:n - 1]) for b, s in enumerate(scripts)})
    for rec in recs:
        dropped_rows = set()
        for prev, cur in zip(rec.calls, rec.calls[1:]):
            assert cur["ids"].shape[1] <= gen_mod.LOOKBEHIND + 8  # never the whole context again
            width = min(prev["mask"].shape[1], cur["mask"].shape[1] - cur["ids"].shape[1])
            lost = (prev["mask"][:, :width] == 1) & (cur["mask"][:, :width] == 0)
            dropped_rows |= set(torch.nonzero(lost.any(dim=1)).flatten().tolist())
            if prev["mask"].shape[1] > width:  # cropped for real: the dropped tail was live
                dropped_rows |= set(torch.nonzero(prev["mask"][:, width:].any(dim=1)).flatten().tolist())
        assert dropped_rows  # some cached tokens were replaced by a re-tokenisation
    assert any(c["ids"].shape[1] == 1 for c in recs[0].calls[1:])


def test_split_character_waits_for_model_without_byte_tokens(setup):
    """WordPiece has no byte tokens: the first byte of `é` stays pending (the model is fed nothing) until
    the character is complete; an invalid byte it cannot spell is skipped. The BPE spells both."""
    bpe, wp = setup["toks"][0], train_wordpiece()
    vmap = VocabMap.from_tokenizers([bpe, wp])
    wp_stream = gen_mod._Stream(tiny_llama(wp, 2), wp, vmap, 1, ["hi"])
    bpe_stream = gen_mod._Stream(setup["models"][0], bpe, vmap, 0, ["hi"])
    first, second = "é".encode()[:1], "é".encode()[1:]
    for data in (first, second):
        u = vmap.text_id(data)
        assert u is not None and int(vmap.from_union[1][u]) == -1
        wp_stream.append(0, u, data)
        bpe_stream.append(0, u, data)
        if data == first:
            assert wp_stream.pending[0] == first and wp_stream.ids[0] == wp("hi")["input_ids"]
    assert wp_stream.pending[0] == b""
    assert wp_stream.ids[0][wp_stream.n_prompt[0]:] == wp("é", add_special_tokens=False)["input_ids"]
    assert token_bytes(vmap, 0, bpe_stream.ids[0][bpe_stream.n_prompt[0]:]) == "é".encode()
    assert wp_stream._encode(b"ab \xff cd") == (wp("ab cd", add_special_tokens=False)["input_ids"], b"")


def test_batched_rows_equal_single_rows(setup):
    models, toks = setup["models"], setup["toks"]
    batched = generate(models, toks, PROMPTS, max_new_tokens=10)
    assert batched == [generate(models, toks, p, max_new_tokens=10) for p in PROMPTS]


def test_sampling_and_options(setup):
    models, toks = setup["models"], setup["toks"]
    a = generate(models, toks, PROMPTS[:2], max_new_tokens=6, greedy=False, seed=3, weights=[0.3, 0.7])
    assert a == generate(models, toks, PROMPTS[:2], max_new_tokens=6, greedy=False, seed=3,
                         weights=[0.3, 0.7])
    seeds = {tuple(generate(models, toks, PROMPTS[:2], max_new_tokens=6, greedy=False, seed=s))
             for s in range(4)}
    assert len(seeds) > 1  # the seed matters
    for kwargs in ({"mode": "logprob"}, {"top_k": 4}, {"top_k": 4, "greedy": False, "seed": 1}):
        out = generate(models, toks, PROMPTS[:2], max_new_tokens=4, **kwargs)
        assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_top_k_sampling_follows_candidate_probs(monkeypatch):
    """generate's own draw among the top-k union candidates: 6000 rows with the same logits, counts
    vs union_topk's probabilities renormalised over the k candidates; chi2 < df + 10 sqrt(2 df). A draw
    from a skewed uniform (u**2, a plausible bug) must fail the same test."""
    vmap = VocabMap.from_token_bytes([[b"a", b"b", b"c", b"d", b"e", b"f"], [b"b", b"c", b"x", b"y", b"a"]])
    g = torch.Generator().manual_seed(0)
    rows, k = 6000, 3
    logits = [torch.randn(1, v, generator=g).expand(rows, -1).contiguous() for v in (6, 5)]
    probs, ids = union_topk(logits, vmap, k)
    law = probs[0] / probs[0].sum()

    def chi2():
        picked = gen_mod._choose(logits, vmap, None, False, 7, 0, "prob", k)
        counts = torch.stack([(picked == u).sum() for u in ids[0]]).double()
        assert int(counts.sum()) == rows  # only real candidates are drawn
        expected = law.double() * rows
        return float(((counts - expected) ** 2 / expected).sum())

    df = k - 1
    assert chi2() < df + 10 * (2 * df) ** 0.5
    real = gen_mod.rand
    monkeypatch.setattr(gen_mod, "rand", lambda *a, **kw: real(*a, **kw) ** 2)
    assert chi2() > df + 10 * (2 * df) ** 0.5


def test_top_k_greedy_equals_full_greedy_for_one_model(setup):
    # Byte-level BPE: one model id per union id, so the best of the top k is the overall best.
    model, tok = setup["models"][0], setup["toks"][0]
    assert generate([model], [tok], PROMPTS, max_new_tokens=6, top_k=3) == generate(
        [model], [tok], PROMPTS, max_new_tokens=6)


def test_logprob_greedy_equals_prob_greedy_for_one_model(setup):
    # With one model the product of experts is that model's distribution: the same argmax as mode "prob".
    model, tok = setup["models"][0], setup["toks"][0]
    assert generate([model], [tok], PROMPTS, max_new_tokens=6, mode="logprob") == generate(
        [model], [tok], PROMPTS, max_new_tokens=6)


def test_bad_input(setup):
    models, toks = setup["models"], setup["toks"]
    with pytest.raises(ValueError, match="tokenizers must hold one tokenizer per model: 2 models, got 1"):
        generate(models, toks[:1], "hi", max_new_tokens=2)
    with pytest.raises(ValueError, match="models must be a non-empty list"):
        generate([], [], "hi", max_new_tokens=2)
    with pytest.raises(TypeError, match=r"models\[1\] must be a torch.nn.Module"):
        generate([models[0], "llama"], toks, "hi", max_new_tokens=2)
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a str"):
        generate(models, toks, ["hi", 3], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompts must be a str or a non-empty list"):
        generate(models, toks, [], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(models, toks, "hi", max_new_tokens=-1)
    with pytest.raises(ValueError, match="seed: sampling"):
        generate(models, toks, "hi", max_new_tokens=2, greedy=False)
    with pytest.raises(ValueError, match="vmap was built for vocabularies"):
        generate(models, toks, "hi", max_new_tokens=2, vmap=VocabMap.from_tokenizers(toks))
    with pytest.raises(ValueError, match=r"model_vocab_sizes\[0\] = 10 is smaller"):
        VocabMap.from_tokenizers(toks, model_vocab_sizes=[10, 10])
    assert generate(models, toks, ["hi"], max_new_tokens=0) == [""]

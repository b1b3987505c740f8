"""pyfuse.spec.speculative_generate with tiny randomly initialised Llama models built locally."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from pyfuse.spec import speculative_generate  # noqa: E402

VOCAB = 64


def tiny_llama(seed, vocab=VOCAB):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def noisy_copy(model, scale, seed):
    """A draft that agrees with the target often but not always: ragged acceptance across requests."""
    draft = tiny_llama(0)
    draft.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return draft


@pytest.fixture(scope="module")
def models():
    target = tiny_llama(0)
    return target, noisy_copy(target, 0.3, 1)


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny forwards: thread wake-ups would dominate on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_greedy_equals_target_generate_batch1(models):
    target, draft = models
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    expected = target.generate(ids, do_sample=False, max_new_tokens=16)
    out = speculative_generate(target, draft, ids, max_new_tokens=16, num_draft_tokens=3)
    assert torch.equal(out.sequences[:, : expected.shape[1]], expected)
    assert 0 < int(out.accepted.sum()) < int(out.drafted.sum())


@pytest.mark.parametrize("tree", [None, [2, 2, 1]], ids=["chain", "tree"])
def test_greedy_equals_target_generate_left_padded_batch(models, tree):
    target, draft = models
    ids = torch.tensor([[1, 5, 9, 3, 7, 11], [0, 0, 4, 8, 6, 13], [0, 0, 0, 0, 21, 22]])
    mask = (torch.arange(6) >= torch.tensor([[0], [2], [4]])).long()
    expected = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=14)
    out = speculative_generate(target, draft, ids, attention_mask=mask, max_new_tokens=14, num_draft_tokens=4,
                               tree=tree)
    assert torch.equal(out.sequences[:, : expected.shape[1]], expected)
    assert len(set(out.accepted.tolist())) > 1, "expected ragged acceptance across requests"
    # The draft is the target: every round accepts a full chain / a full root-to-leaf path.
    same = speculative_generate(target, target, ids, attention_mask=mask, max_new_tokens=10, num_draft_tokens=4,
                                tree=tree)
    depth = 4 if tree is None else len(tree)
    assert (same.accepted == depth * same.steps).all()
    assert torch.equal(same.sequences, out.sequences[:, : same.sequences.shape[1]])


def test_eos_stops_a_request_and_pads(models):
    target, draft = models
    ids = torch.tensor([[1, 5, 9], [2, 6, 10]])
    free = speculative_generate(target, draft, ids, max_new_tokens=8, eos_token_id=[])
    eos = int(free.sequences[0, 5])  # the 3rd generated token of request 0 becomes its end of sequence
    out = speculative_generate(target, draft, ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=63)
    first = free.sequences[0, 3:].tolist().index(eos) + 1
    assert out.num_generated[0] == first
    assert (out.sequences[0, 3 + first:] == 63).all()
    assert torch.equal(out.sequences[0, : 3 + first], free.sequences[0, : 3 + first])


def test_sampling_is_seeded():
    target, draft = tiny_llama(0), tiny_llama(1)
    ids = torch.tensor([[1, 5, 9], [4, 4, 4]])
    run = lambda seed: speculative_generate(target, draft, ids, max_new_tokens=8, temperature=0.8,  # noqa: E731
                                            seed=seed, eos_token_id=[]).sequences
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a >= 0) & (a < VOCAB)).all()


@pytest.mark.parametrize("tree", [None, [3, 1]], ids=["chain", "tree"])
def test_first_token_follows_target_distribution(tree):
    """300 identical requests, temperature 0.7: the first generated token passes chi2 < df + 10 sqrt(2 df)
    against the target's softmax(logits / 0.7) (chain: rejection_sample; tree: verify_tree stochastic with
    i.i.d. sibling drafts). Broken variant: the same samples against T = 1.4 must fail."""
    target = tiny_llama(0)
    target.lm_head.weight.data.mul_(10)  # sharpen the tiny model's near-uniform next-token law
    draft = noisy_copy(target, 0.1, 2)
    prompt, samples, temperature = [1, 5, 9, 3], 300, 0.7
    ids = torch.tensor([prompt] * samples)
    out = speculative_generate(target, draft, ids, max_new_tokens=1, num_draft_tokens=2, temperature=temperature,
                               seed=11, eos_token_id=[], tree=tree)
    counts = torch.bincount(out.sequences[:, len(prompt)], minlength=VOCAB).double()
    with torch.no_grad():
        logits = target(torch.tensor([prompt])).logits[0, -1].double()
    for t, should_pass in ((temperature, True), (2 * temperature, False)):
        expected = torch.softmax(logits / t, -1) * samples
        big = expected >= 5
        stat = float((((counts - expected) ** 2 / expected)[big]).sum())
        rest_e, rest_o = float(expected[~big].sum()), float(counts[~big].sum())
        df = int(big.sum()) - 1
        if rest_e > 0:
            stat += (rest_o - rest_e) ** 2 / rest_e
            df += 1
        assert (stat < df + 10 * math.sqrt(2 * df)) == should_pass, f"T={t}: chi2 {stat:.1f}, df {df}"


@pytest.mark.parametrize("kwargs,match", [
    ({"num_draft_tokens": 0}, "num_draft_tokens"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"attention_mask": torch.ones(1, 3, dtype=torch.long)}, "attention_mask must have the shape"),
    ({"tree": []}, "tree must be a non-empty"),
    ({"tree": [2, 0]}, "tree entries"),
])
def test_bad_arguments(models, kwargs, match):
    target, draft = models
    args = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        speculative_generate(target, draft, torch.tensor([[1, 2]]), **args)

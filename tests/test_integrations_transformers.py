"""pyfuse.integrations.transformers against the installed transformers: the patch routes assisted generation
through pyfuse, and the drop-in samples the same law as transformers' own ``_speculative_sampling``."""
import math
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.generation import utils as hf_utils  # noqa: E402

from pyfuse.integrations import transformers as pt  # noqa: E402


def tiny_llama(seed, vocab=64):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def test_patch_routes_assisted_sampling_through_pyfuse():
    target, draft = tiny_llama(0), tiny_llama(1)
    original = hf_utils._speculative_sampling
    ids = torch.tensor([[1, 5, 9, 3]])
    with mock.patch.object(pt, "rejection_sample", wraps=pt.rejection_sample) as spy:
        with pt.patched():
            assert hf_utils._speculative_sampling is pt.speculative_sampling
            out = target.generate(ids, assistant_model=draft, do_sample=True, max_new_tokens=10, pad_token_id=0)
        assert hf_utils._speculative_sampling is original
    assert spy.call_count >= 1
    assert 4 < out.shape[1] <= 14 and torch.equal(out[:, :4], ids)  # shorter only if EOS (id 2) was sampled
    assert ((out >= 0) & (out < 64)).all()
    pt.patch()
    pt.patch()  # idempotent: unpatch still restores the original
    pt.unpatch()
    assert hf_utils._speculative_sampling is original


def _exact_law(candidate, cand_logits, new_logits):
    """{(n_matches, token): prob} of Algorithm 1 for one fixed draft."""
    q, p = cand_logits[0].double().softmax(-1), new_logits[0].double().softmax(-1)
    law, reach = {}, 1.0
    for i, x in enumerate(candidate):
        a = min(1.0, float(p[i, x] / q[i, x]))
        residual = (p[i] - q[i]).clamp(min=0)
        for t, v in enumerate((residual / residual.sum()).tolist()):
            law[(i, t)] = law.get((i, t), 0.0) + reach * (1 - a) * v
        reach *= a
    for t, v in enumerate(p[len(candidate)].tolist()):
        law[(len(candidate), t)] = law.get((len(candidate), t), 0.0) + reach * v
    return law


def _chi2(counts, law, samples):
    """Chi-square against the exact law; cells with expected < 5 merged into one."""
    stat, df, rest_e, rest_o = 0.0, -1, 0.0, 0
    for cell, v in law.items():
        e = v * samples
        if e >= 5:
            stat += (counts.get(cell, 0) - e) ** 2 / e
            df += 1
        else:
            rest_e += e
            rest_o += counts.get(cell, 0)
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
        df += 1
    return stat, df


def _sample(fn, candidate_input_ids, cand_logits, k, new_logits, samples):
    counts = {}
    for _ in range(samples):
        tokens, n = fn(candidate_input_ids, cand_logits, k, new_logits)
        n = int(n)
        assert tokens.shape == (1, n + 1) and tokens.dtype == torch.int64
        assert torch.equal(tokens[0, :n], candidate_input_ids[0, -k:][:n])
        counts[(n, int(tokens[0, n]))] = counts.get((n, int(tokens[0, n])), 0) + 1
    return counts


@pytest.fixture
def one_thread():
    """Thousands of tiny calls: OpenMP/intra-op thread wake-ups would dominate on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_drop_in_matches_transformers_law(one_thread):
    """V = 5, 3 drafts: transformers' function and the drop-in both pass chi2 < df + 10 sqrt(2 df) against
    the exact law of Algorithm 1; the drop-in told the wrong q (uniform draft logits) must fail it."""
    torch.manual_seed(0)
    vocab, k, samples = 5, 3, 3000
    cand_logits = torch.randn(1, k, vocab) * 1.5
    new_logits = torch.randn(1, k + 1, vocab) * 1.5
    drafts = torch.stack([torch.multinomial(cand_logits[0, i].softmax(-1), 1)[0] for i in range(k)])
    candidate_input_ids = torch.cat([torch.tensor([7, 1]), drafts])[None]
    law = _exact_law(drafts.tolist(), cand_logits, new_logits)
    for fn, logits, should_pass in ((hf_utils._speculative_sampling, cand_logits, True),
                                    (pt.speculative_sampling, cand_logits, True),
                                    (pt.speculative_sampling, torch.zeros_like(cand_logits), False)):
        counts = _sample(fn, candidate_input_ids, logits, k, new_logits, samples)
        stat, df = _chi2(counts, law, samples)
        threshold = df + 10 * math.sqrt(2 * df)
        assert (stat < threshold) == should_pass, f"{fn.__module__}: chi2 {stat:.1f}, df {df}, pass={should_pass}"


def test_ensemble_weight_defers_to_transformers():
    torch.manual_seed(1)
    ids, cl, nl = torch.tensor([[3, 1, 2]]), torch.randn(1, 2, 6), torch.randn(1, 3, 6)
    with mock.patch.object(pt, "rejection_sample") as spy:
        tokens, n = pt.speculative_sampling(ids, cl, 2, nl, assistant_ensemble_weight=0.5)
    assert spy.call_count == 0 and tokens.shape == (1, int(n) + 1)

"""The one-pass CPU row check behind rejection_sample's validation (csrc/cpu/spec_validate.cpp) against the
torch reductions it replaces, the errors it raises through the public API above the size threshold, and the
vectorised softmax of the CPU logits path (csrc/cpu/spec_chain.cpp) on large odd vocabularies."""
from __future__ import annotations

import math

import pytest
import torch

from pyfuse.reference import spec as ref
from pyfuse.spec import rejection_sample, verify_greedy
from pyfuse.spec import validate as SV

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Above ROW_CHECK_MIN_NUMEL with B * (K + 1) rows, and V not a multiple of the 16-lane blocks.
B, K, V = 2, 3, 6007


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _probs(shape, g, dtype=torch.float32):
    return torch.softmax(torch.randn(*shape, generator=g) * 3, dim=-1).to(dtype)


def _check(t, logits):
    out = SV._row_check(t, logits)
    assert out is not None, "the fused row check should apply to this tensor"
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_check_matches_torch(dtype):
    g = _gen(0)
    base = _probs((3, 5, V + 7), g, dtype)[:, 1:, 3:V + 3]  # strided rows, unaligned start
    assert not base.is_contiguous() and base.numel() >= SV.ROW_CHECK_MIN_NUMEL
    worst, worst_row, lo, lo_row = _check(base, logits=False)
    dev = (base.sum(-1, dtype=torch.float32) - 1).abs()
    # fp32 sums in a different order than torch's: equal to rounding, and the same worst row.
    assert worst == pytest.approx(dev.max().item(), rel=1e-3, abs=1e-6)
    assert dev[worst_row].item() == pytest.approx(dev.max().item(), rel=1e-3, abs=1e-6)
    assert lo == base.amin().float().item() and base[lo_row].amin() == base.amin()
    # Logits: worst |row max|.
    lg = (torch.randn(3, 4, V, generator=g) * 4).to(dtype)
    worst, worst_row, _, _ = _check(lg, logits=True)
    assert worst == lg.amax(-1).float().abs().max().item()
    assert lg[worst_row].amax().float().abs().item() == worst


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_check_flags_bad_rows(dtype):
    g = _gen(1)
    p = _probs((B, K + 1, V), g, dtype)
    for value, row in ((float("nan"), (1, 2)), (float("inf"), (0, 3)), (float("-inf"), (1, 0))):
        bad = p.clone()
        bad[row][V - 1] = value  # the last element sits in the tail block
        worst, worst_row, _, _ = _check(bad, logits=False)
        assert not math.isfinite(worst) and worst_row == row
    neg = p.clone()
    neg[1, 1, 5] = -0.25
    assert _check(neg, logits=False)[2:] == (-0.25, (1, 1))
    lg = torch.randn(B, K + 1, V, generator=g).to(dtype)
    for value, row in ((float("nan"), (0, 1)), (float("inf"), (1, 3))):
        bad = lg.clone()
        bad[row][V - 2] = value
        worst, worst_row, _, _ = _check(bad, logits=True)
        assert not math.isfinite(worst) and worst_row == row
    masked = lg.clone()
    masked[1, 2] = float("-inf")  # an all -inf row has no finite logit
    worst, worst_row, _, _ = _check(masked, logits=True)
    assert worst == math.inf and worst_row == (1, 2)
    partly = lg.clone()
    partly[1, 2, :-1] = float("-inf")  # one finite logit is enough
    assert math.isfinite(_check(partly, logits=True)[0])


def test_row_check_2d_and_threshold():
    p = _probs((9, V), _gen(2))
    assert _check(p, logits=False)[1] in [(r,) for r in range(9)]
    assert SV._row_check(p[:1, :100], logits=False) is None  # small: torch path
    assert SV._row_check(p.t(), logits=False) is None  # vocabulary not unit-stride: torch path


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_errors_above_threshold(dtype):
    """The fused path raises the same errors as the torch path, naming the argument and the row; the sum
    tolerance decides on both sides of PROB_SUM_ATOL (a valid input passes: the test can fail both ways)."""
    g = _gen(3)
    target, draft = _probs((B, K + 1, V), g, dtype), _probs((B, K, V), g, dtype)
    ids = torch.randint(0, V, (B, K), generator=g)
    assert draft.numel() >= SV.ROW_CHECK_MIN_NUMEL
    rejection_sample(ids, target, draft, seed=0)  # valid: no error
    atol = SV.PROB_SUM_ATOL[dtype]
    ok, over = target.float().clone(), target.float().clone()
    ok[1, 2] *= 1 + atol / 4
    over[1, 2] *= 1 + 4 * atol
    rejection_sample(ids, ok.to(dtype), draft, seed=0)
    with pytest.raises(ValueError, match=r"target_probs: every row must be finite and sum to 1.*row \[1, 2\]"):
        rejection_sample(ids, over.to(dtype), draft, seed=0)
    nan = draft.clone()
    nan[0, 1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"draft_probs: every row must be finite and sum to 1.*row \[0, 1\]"):
        rejection_sample(ids, target, nan, seed=0)
    neg = target.clone()
    neg[1, 0, 0], neg[1, 0, 1] = -0.125, neg[1, 0, 1] + 0.125
    with pytest.raises(ValueError, match=r"target_probs must be non-negative; found -0.125 \(row \[1, 0\]\)"):
        rejection_sample(ids, neg, draft, seed=0)
    logits = torch.randn(B, K + 1, V, generator=g).to(dtype)
    verify_greedy(ids, logits)
    logits[0, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"target_logits: rows must hold no NaN.*row \[0, 2\]"):
        verify_greedy(ids, logits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_large_vocab_match_reference(dtype):
    """The CPU softmax (polynomial exp, lane sums) against the reference's torch softmax on a vocabulary with
    a tail block and -inf masks: same tokens under injected uniforms."""
    g = _gen(4)
    tl = (torch.randn(B, K + 1, V, generator=g) * 3).to(dtype)
    dl = (tl[:, :K].float() + torch.randn(B, K, V, generator=g)).to(dtype)
    tl[..., ::3] = float("-inf")
    ids = torch.multinomial(ref.softmax(dl, 0.8).reshape(-1, V), 1, generator=g).view(B, K)
    for trial in range(4):
        u = torch.rand((2, B, K + 1), generator=g)
        kw = dict(target_logits=tl, draft_logits=dl, temperature=0.8, uniforms=u)
        got = rejection_sample(ids, backend="cpu", **kw)
        want = rejection_sample(ids, backend="reference", **kw)
        assert torch.equal(got.num_accepted, want.num_accepted), trial
        assert torch.equal(got.token_ids, want.token_ids), trial
        emitted = got.token_ids.gather(1, got.num_accepted.long()[:, None])
        assert (emitted % 3 != 0).all()  # masked tokens (probability exactly 0) are never emitted

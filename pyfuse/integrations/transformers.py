"""Hugging Face transformers: a drop-in for ``transformers.generation.utils._speculative_sampling`` on
``pyfuse.spec.rejection_sample``, and ``patch()`` / ``unpatch()`` / ``patched()`` to install it, so that
assisted generation with ``do_sample=True`` (``model.generate(..., assistant_model=draft, do_sample=True)``)
verifies its drafts with pyfuse.

Same signature and return as transformers 5.x. Randomness: one Philox seed per call drawn from torch's
default CPU generator, so ``torch.manual_seed`` makes runs reproducible (the exact stream differs from
transformers' own ``rand_like`` + ``multinomial``; the output law is the same). With
``assistant_ensemble_weight`` set (DIVERSE, a lossy rule pyfuse does not implement) the call is handed to
transformers' original function.
"""
from __future__ import annotations

import contextlib

import torch

from ..spec import rejection_sample

_original = None  # transformers' function while patched


def speculative_sampling(candidate_input_ids, candidate_logits, candidate_length, new_logits,
                         assistant_ensemble_weight: float | None = None):
    """Algorithm 1 of Leviathan et al. for one sequence: returns (valid_tokens ``[1, n_matches + 1]`` int64,
    n_matches 0-d tensor), as transformers' ``_speculative_sampling``."""
    if assistant_ensemble_weight is not None:
        return _transformers_original()(candidate_input_ids, candidate_logits, candidate_length, new_logits,
                                        assistant_ensemble_weight=assistant_ensemble_weight)
    if candidate_input_ids.shape[0] != 1:
        raise ValueError(f"speculative_sampling expects batch size 1 (as transformers), got "
                         f"{candidate_input_ids.shape[0]}")
    drafts = candidate_input_ids[:, candidate_input_ids.shape[1] - candidate_length:]
    out = rejection_sample(drafts, target_logits=new_logits.float(), draft_logits=candidate_logits.float())
    n_matches = out.num_accepted[0].to(torch.int64)
    valid_tokens = out.token_ids[:, : int(n_matches) + 1].to(torch.int64)
    return valid_tokens, n_matches


def _transformers_original():
    if _original is not None:
        return _original
    from transformers.generation import utils

    return utils._speculative_sampling


def patch():
    """Make transformers' assisted generation call ``speculative_sampling`` (idempotent)."""
    global _original
    from transformers.generation import utils

    if _original is None:
        _original = utils._speculative_sampling
        utils._speculative_sampling = speculative_sampling


def unpatch():
    """Restore transformers' own function (no-op when not patched)."""
    global _original
    from transformers.generation import utils

    if _original is not None:
        utils._speculative_sampling = _original
        _original = None


@contextlib.contextmanager
def patched():
    """``with patched(): model.generate(...)`` — patch for the block only (restores a prior state)."""
    was_patched = _original is not None
    patch()
    try:
        yield
    finally:
        if not was_patched:
            unpatch()

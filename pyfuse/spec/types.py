"""Result types of the speculative-decoding verification ops."""
from __future__ import annotations

from typing import NamedTuple

import torch

# Padding value of SpecOutput.token_ids after a request's last emitted token (vLLM/FlashInfer convention).
PLACEHOLDER_TOKEN_ID = -1


class SpecOutput(NamedTuple):
    """Result of verifying one batch of drafts.

    token_ids: int32 ``[B, max_draft_len + 1]``. Row b holds the ``num_accepted[b]`` accepted draft tokens,
        then one more token (the correction at the first rejected position, or the bonus token when every
        draft token was accepted), then ``PLACEHOLDER_TOKEN_ID`` (-1). Every other entry is in ``[0, V)``.
    num_accepted: int32 ``[B]``; request b emits ``num_accepted[b] + 1`` tokens.
    """

    token_ids: torch.Tensor
    num_accepted: torch.Tensor

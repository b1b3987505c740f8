"""Speculative-decoding verification: chain ops (``verify_greedy``, ``rejection_sample``,
``typical_accept``) on padded or ragged batches, returning ``SpecOutput``."""
from .chain import rejection_sample, typical_accept, verify_greedy
from .generate import GenerateOutput, speculative_generate
from .tree import TreeOutput, verify_tree
from .types import PLACEHOLDER_TOKEN_ID, SpecOutput

__all__ = ["PLACEHOLDER_TOKEN_ID", "SpecOutput", "rejection_sample", "typical_accept", "verify_greedy",
           "TreeOutput", "verify_tree", "GenerateOutput", "speculative_generate"]

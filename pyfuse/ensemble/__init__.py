"""Cross-vocabulary logit ensembling."""
from .generate import generate
from .ops import NextToken, next_token, union_probs, union_topk
from .vocab import VocabMap

"""Cross-vocabulary logit ensembling."""
from .generate import generate
from .maps import SimpleVocabMap, build_reverse_index, synthetic_map
from .ops import NextToken, next_token, union_probs, union_topk
from .vocab import VocabMap

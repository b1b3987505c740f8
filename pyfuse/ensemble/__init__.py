"""Cross-vocabulary logit ensembling."""
from .vocab import VocabMap

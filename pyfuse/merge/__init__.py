"""Model merging: ``merge_tensors`` fuses sparsification, sign election and the weighted combination of K
task vectors into one pass (op ``pyfuse::merge_task_vectors``)."""
from pyfuse.merge.tensors import merge_tensors
from pyfuse.merge.presets import (PRESETS, breadcrumbs, breadcrumbs_ties, dare_linear, dare_ties, della,
                                  della_linear, task_arithmetic, ties)
from pyfuse.merge.models import merge_models, merge_state_dicts

__all__ = ["merge_tensors", "PRESETS", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
           "breadcrumbs_ties", "della", "della_linear", "merge_state_dicts", "merge_models"]

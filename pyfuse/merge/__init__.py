"""Model merging: ``merge_tensors`` fuses sparsification, sign election and the weighted combination of K
task vectors into one pass (op ``pyfuse::merge_task_vectors``)."""
from pyfuse.merge.tensors import merge_tensors

__all__ = ["merge_tensors"]

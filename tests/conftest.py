import os

import torch

# Without a GPU the Triton kernels run on CPU tensors in the interpreter; this must be set before the
# first `import triton` anywhere in the test session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Without a CUDA device, Triton kernels run in its interpreter; it must be on before triton loads."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

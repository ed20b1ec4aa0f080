"""Without a CUDA device, Triton kernels run in its interpreter; it must be on before triton loads."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_kernel_buffers(monkeypatch):
    """Kernel output buffers start as NaN, so an element a kernel never writes fails the test."""
    from lpld_kernels import _dispatch

    def nan_filled(shape, *, dtype, device, stride=None):
        buffer = torch.empty_strided(shape, stride, dtype=dtype, device=device) if stride else torch.empty(
            shape, dtype=dtype, device=device
        )
        return buffer.fill_(float("nan"))

    monkeypatch.setattr(_dispatch, "empty", nan_filled)

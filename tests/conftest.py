"""Shared test set-up. Without a CUDA device, Triton kernels run in its interpreter, which must be on
before triton loads; ``gpu``-marked tests then skip."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests skip cleanly on a machine without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP oversubscription on a busy 2-core machine
    (measured: the foundation test files take 12 s with one thread, 50-90 s with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

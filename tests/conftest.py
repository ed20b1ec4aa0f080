"""Shared test set-up. Without a CUDA device, Triton kernels run in its interpreter, which must be on
before triton loads; ``gpu``-marked tests then skip. ``dali``-marked tests skip where nvidia-dali is
not installed (lpld works without it), and interpreted-kernel tests skip, with the reason, where the
installed Triton's interpreter cannot run (``lpld_kernels._dispatch.check_interpreter``)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests skip cleanly on a machine without CUDA, ``dali``-marked ones without DALI."""
    from lpld.replay import dali_available

    skips = {"gpu": None if torch.cuda.is_available() else "needs a CUDA device",
             "dali": None if dali_available() else "needs nvidia-dali, which is not installed here "
                                                    "(lpld runs without it; pip install nvidia-dali-cuda130)"}
    for item in items:
        for marker, reason in skips.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A kernel test on CPU tensors skips, with the reason, where Triton's interpreter cannot run."""
    from lpld_kernels._dispatch import InterpreterUnavailable

    try:
        return (yield)
    except Exception as error:
        cause = error
        while cause is not None and not isinstance(cause, InterpreterUnavailable):
            cause = cause.__cause__ or cause.__context__  # opcheck and hypothesis wrap what they catch
        if cause is None:
            raise
        pytest.skip(str(cause))


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

"""Shared test set-up. Without a CUDA device, Triton kernels run in its interpreter, which must be on
before triton loads."""
import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_COMPILE_FOR_SM90 = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, variants = json.loads(sys.argv[1])
for name, types, constexprs in variants:
    kernel = getattr(__import__(module, fromlist=[name]), name)
    signature = {p.name: "constexpr" if p.name in constexprs else types.get(p.name, "i32") for p in kernel.params}
    triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
"""


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


@pytest.fixture
def compile_for_gpu():
    """``compile_for_gpu(module, [(kernel, {arg: type}, {arg: constant}), ...])`` compiles Triton
    kernels to sm_90 machine code in a child process without the interpreter: no GPU needed, and it
    catches what the interpreter accepts but the compiler refuses. Unlisted arguments are i32."""

    def compile_(module: str, variants: list) -> None:
        env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
        child = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, json.dumps([module, variants])],
                               env=env, capture_output=True, text=True)
        assert child.returncode == 0, child.stderr[-3000:]

    return compile_

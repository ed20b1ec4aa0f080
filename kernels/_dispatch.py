"""Backend choice and buffer allocation shared by every kernel in lpld_kernels.

One place decides between the fused Triton kernel and the plain PyTorch reference, so every op
behaves the same for ``backend=None | "triton" | "torch"`` and the ``LPLD_KERNEL_BACKEND``
environment variable. The reference runs eager: torch.compile made it 1.3-4x faster on 2 busy CPU cores
(benchmarks/results/kernels-cpu-2c.json) but costs tens of seconds per shape family cold, more
than a short CPU run saves, and CUDA tensors get the fused kernels anyway.

Buffers that a kernel must fully overwrite come from ``empty``; the tests swap it for a
NaN-filled allocator so that an element a kernel forgot to write shows up.
"""
import contextlib
import os

import torch

BACKENDS = ("triton", "torch")
ENV_VAR = "LPLD_KERNEL_BACKEND"


class InterpreterUnavailable(RuntimeError):
    """The Triton interpreter cannot run with the installed Triton and NumPy."""


def triton_interpreted() -> bool:
    """Triton runs on CPU tensors only through its interpreter, switched on before import."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_interpreter() -> None:
    """Triton 3.6's interpreter turns each scalar of a kernel into a Python int with ``int()`` on a
    one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"); Triton 3.7 reads the element instead. Say so before a kernel fails midway."""
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, int]:
        return tuple(int(part) for part in version.split(".")[:2])

    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        raise InterpreterUnavailable(
            f"the Triton {triton.__version__} interpreter cannot run with NumPy {numpy.__version__}: install "
            f"numpy<2.4 or triton>=3.7 to run the kernels on CPU tensors, or use backend='torch'")


def use_triton(backend: str | None, tensor: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernel on ``tensor``'s device.

    ``None`` means auto: Triton (a pinned dependency) for CUDA tensors, the reference otherwise;
    a non-empty ``LPLD_KERNEL_BACKEND`` replaces the auto choice.
    """
    if backend is None:
        backend = os.environ.get(ENV_VAR, "") or None
    if backend is None:
        return tensor.is_cuda
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}: use one of {BACKENDS} or None (auto)")
    if backend == "triton" and not tensor.is_cuda:
        if not triton_interpreted():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing triton, or use backend='torch'"
            )
        check_interpreter()
    return backend == "triton"


def empty(shape, *, dtype: torch.dtype, device: torch.device, stride=None) -> torch.Tensor:
    """Uninitialized buffer that a kernel overwrites in full (tests replace this with NaN fill)."""
    if stride is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


def launching_on(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (``--device cuda:1`` in one
    process would otherwise launch on device 0 with device-1 pointers). On CPU tensors the launch
    is interpreted: ``check_interpreter`` first."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    check_interpreter()
    return contextlib.nullcontext()

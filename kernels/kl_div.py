"""Temperature soft-label KL divergence, the FKD-style student loss (SPEC.md section 6).

    loss = scale / N * sum_i KL( softmax(z_t[i] / T_t) || softmax(z_s[i] / T_s) ),  scale = T_t^2 or 1

equals ``nn.KLDivLoss(reduction="batchmean")`` on log_softmax(z_s / T_s) and softmax(z_t / T_t), or
on log_softmax(z_t / T_t) with ``log_target=True`` (the Tiny recipe, times T^2). The student's
temperature T_s is the teacher's T_t unless given apart (LPQLD's calibrated alignment); ``scale_t2``
squares the teacher's, as LPQLD's Tiny path does. Teacher entries of probability 0 (logit -inf)
contribute 0, the 0 * log 0 = 0 convention.

The fused path runs one Triton program per (row, K slice). A first sweep keeps an online max and
sum of exponentials per lane for both rows (combined once at the end); a second computes the exact
log-probabilities, the slice's loss and the gradient w.r.t. z_s, ``scale / (N T) * (p_s - p_t)``,
written during the forward. When rows alone cannot fill a GPU (ImageNet-21K: N = 32, K = 10,450)
K is cut into slices: ``_log_sum_exp_kernel`` writes each slice's log-sum-exps, and every slice
program of the loss kernel merges its row's slices before its second sweep. The gradient is
``scale / (N T_s) * (p_s - p_t)``; backward only scales it; nothing of size [N, K] is kept besides it. The op is the ``torch.library``
custom op ``lpld::soft_kl_div`` (fake implementation, registered autograd), so a compiled student
calls it without a graph break.
"""
import functools

import torch
import triton
import triton.language as tl
from torch import nn

from . import _dispatch

MAX_BLOCK_K = 4096
MIN_SLICE_K = 1024  # columns per K slice: below this, slicing costs more than it spreads
MAX_SLICES = 64


@triton.jit
def _log_sum_exp_step(running_max, running_sum, values):
    """One online log-sum-exp step per lane; an all -inf lane shifts by 0, never by -inf."""
    new_max = tl.maximum(running_max, values)
    shift = tl.where(new_max == -float("inf"), 0.0, new_max)
    return new_max, running_sum * tl.exp(running_max - shift) + tl.exp(values - shift)


@triton.jit
def _log_sum_exp_finish(lane_max, lane_sum):
    row_max = tl.max(lane_max, axis=0)
    shift = tl.where(row_max == -float("inf"), 0.0, row_max)
    return shift + tl.log(tl.sum(lane_sum * tl.exp(lane_max - shift), axis=0))


@triton.jit
def _row_log_sum_exps(student_row, teacher_row, k_begin, k_end, inv_student, inv_teacher, BLOCK_K: tl.constexpr):
    """log sum exp of z_s / T_s and of z_t / T_t over columns [k_begin, k_end) of one row."""
    max_s = tl.full([BLOCK_K], -float("inf"), dtype=tl.float32)
    max_t = tl.full([BLOCK_K], -float("inf"), dtype=tl.float32)
    sum_s = tl.zeros([BLOCK_K], dtype=tl.float32)
    sum_t = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(k_begin, k_end, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        s = tl.load(student_row + k, mask=k < k_end, other=-float("inf")).to(tl.float32) * inv_student
        t = tl.load(teacher_row + k, mask=k < k_end, other=-float("inf")).to(tl.float32) * inv_teacher
        max_s, sum_s = _log_sum_exp_step(max_s, sum_s, s)
        max_t, sum_t = _log_sum_exp_step(max_t, sum_t, t)
    return _log_sum_exp_finish(max_s, sum_s), _log_sum_exp_finish(max_t, sum_t)


@triton.jit
def _log_sum_exp_kernel(
    student_ptr, teacher_ptr, lse_ptr, K, slice_k, stride_student, stride_teacher, inv_student, inv_teacher,
    BLOCK_K: tl.constexpr,
):
    """Log-sum-exps of one (row, K slice): lse_ptr[row, slice] = (student's, teacher's)."""
    row = tl.program_id(0).to(tl.int64)
    k_begin = tl.program_id(1) * slice_k
    lse_s, lse_t = _row_log_sum_exps(student_ptr + row * stride_student, teacher_ptr + row * stride_teacher,
                                     k_begin, tl.minimum(k_begin + slice_k, K), inv_student, inv_teacher, BLOCK_K)
    at = lse_ptr + 2 * (row * tl.num_programs(1) + tl.program_id(1))
    tl.store(at, lse_s)
    tl.store(at + 1, lse_t)


@triton.jit
def _soft_kl_kernel(
    student_ptr, teacher_ptr, lse_ptr, slice_loss_ptr, grad_ptr,
    K, slice_k, stride_student, stride_teacher, stride_grad, inv_student, inv_teacher, grad_scale,
    BLOCK_K: tl.constexpr, BLOCK_SLICES: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    """Loss (and gradient) of one (row, K slice); with one slice the row's log-sum-exps are computed
    here, else merged from ``_log_sum_exp_kernel``'s slices."""
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * stride_student
    teacher_row = teacher_ptr + row * stride_teacher
    slices = tl.num_programs(1)
    if BLOCK_SLICES == 1:
        lse_s, lse_t = _row_log_sum_exps(student_row, teacher_row, 0, K, inv_student, inv_teacher, BLOCK_K)
    else:
        parts = tl.arange(0, BLOCK_SLICES)
        at = lse_ptr + 2 * (row * slices + parts)
        part_s = tl.load(at, mask=parts < slices, other=-float("inf"))
        part_t = tl.load(at + 1, mask=parts < slices, other=-float("inf"))
        ones = tl.full([BLOCK_SLICES], 1.0, dtype=tl.float32)
        lse_s = _log_sum_exp_finish(part_s, ones)
        lse_t = _log_sum_exp_finish(part_t, ones)
    k_begin = tl.program_id(1) * slice_k
    k_end = tl.minimum(k_begin + slice_k, K)
    loss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(k_begin, k_end, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        s = tl.load(student_row + k, mask=k < k_end, other=0.0).to(tl.float32) * inv_student
        t = tl.load(teacher_row + k, mask=k < k_end, other=-float("inf")).to(tl.float32) * inv_teacher
        log_p_s = tl.minimum(s - lse_s, 0.0)  # <= 0 anyway; keeps masked lanes (s = 0) from overflowing
        log_p_t = t - lse_t
        p_t = tl.exp(log_p_t)
        loss += p_t * tl.where(p_t > 0.0, log_p_t - log_p_s, 0.0)
        if WRITE_GRAD:
            grad = (tl.exp(log_p_s) - p_t) * grad_scale
            tl.store(grad_ptr + row * stride_grad + k, grad.to(grad_ptr.dtype.element_ty), mask=k < k_end)
    tl.store(slice_loss_ptr + row * slices + tl.program_id(1), tl.sum(loss, axis=0))


@functools.lru_cache
def wanted_programs(device: torch.device) -> int:
    """Enough programs to fill a GPU; one on the CPU, where the interpreter pays per program."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def launch_config(rows: int, classes: int, programs: int) -> tuple[int, int, int, int]:
    """(slices, columns per slice, BLOCK_K, num_warps): K is sliced only when the rows leave a GPU of
    ``programs`` wanted programs idle, and never below MIN_SLICE_K columns per slice."""
    slices = 1
    if rows < programs:
        slices = max(1, min(triton.cdiv(programs, rows), classes // MIN_SLICE_K, MAX_SLICES))
    slice_k = triton.cdiv(classes, slices)
    block_k = min(triton.next_power_of_2(slice_k), MAX_BLOCK_K)
    if slices > 1:
        slice_k = triton.cdiv(slice_k, block_k) * block_k
        slices = triton.cdiv(classes, slice_k)
    # 16 warps past 1024 columns: with 8, Triton 3.8 spilled the bf16 log-sum-exp pass to the stack on sm_100
    return slices, slice_k, block_k, 4 if block_k <= 1024 else 16


def _triton_forward(student, teacher, temperature, student_temperature, scale, need_grad):
    student = student if student.stride(1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(1) == 1 else teacher.contiguous()
    rows, classes = student.shape
    slices, slice_k, block_k, num_warps = launch_config(rows, classes, wanted_programs(student.device))
    slice_loss = _dispatch.empty((rows, slices), dtype=torch.float32, device=student.device)
    grad = (_dispatch.empty((rows, classes), dtype=student.dtype, device=student.device) if need_grad
            else student.new_empty((0,)))
    lse = slice_loss
    if slices > 1:
        lse = _dispatch.empty((rows, slices, 2), dtype=torch.float32, device=student.device)
        _log_sum_exp_kernel[(rows, slices)](
            student, teacher, lse, classes, slice_k, student.stride(0), teacher.stride(0), 1.0 / student_temperature,
            1.0 / temperature, BLOCK_K=block_k, num_warps=num_warps,
        )
    _soft_kl_kernel[(rows, slices)](
        student, teacher, lse, slice_loss, grad if need_grad else slice_loss,
        classes, slice_k, student.stride(0), teacher.stride(0), classes, 1.0 / student_temperature, 1.0 / temperature,
        scale / (rows * student_temperature),
        BLOCK_K=block_k, BLOCK_SLICES=triton.next_power_of_2(slices), WRITE_GRAD=need_grad, num_warps=num_warps,
    )
    return slice_loss.sum() * (scale / rows), grad


def _torch_forward(student, teacher, temperature, student_temperature, scale, need_grad):
    """The op's outputs with torch ops: the loss (differentiable, so also the reference) and the
    closed-form gradient."""
    dtype = _accumulate_dtype(student.dtype, teacher.dtype)
    log_p_s = torch.log_softmax(student.to(dtype) / student_temperature, dim=1)
    log_p_t = torch.log_softmax(teacher.to(dtype) / temperature, dim=1)
    p_t = log_p_t.exp()
    rows = student.shape[0]
    loss = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0).sum() * (scale / rows)
    if not need_grad:
        return loss, student.new_empty((0,))
    return loss, ((log_p_s.exp() - p_t) * (scale / (rows * student_temperature))).to(student.dtype)


def _accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return functools.reduce(torch.promote_types, dtypes, torch.float32)


@torch.library.custom_op("lpld::soft_kl_div", mutates_args=())
def _soft_kl_div_op(student: torch.Tensor, teacher: torch.Tensor, temperature: float, student_temperature: float,
                    scale: float, need_grad: bool, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, gradient w.r.t. the student logits, or an empty tensor when ``need_grad`` is False);
    ``temperature`` is the teacher's."""
    if not use_triton:
        return _torch_forward(student, teacher, temperature, student_temperature, scale, need_grad)
    with _dispatch.launching_on(student):
        return _triton_forward(student, teacher, temperature, student_temperature, scale, need_grad)


@_soft_kl_div_op.register_fake
def _(student, teacher, temperature, student_temperature, scale, need_grad, use_triton):
    loss = student.new_empty((), dtype=torch.float32 if use_triton else _accumulate_dtype(student.dtype, teacher.dtype))
    return loss, torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else student.new_empty((0,))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, _grad_of_grad):
    # Out of place: AOTAutograd's partitioner refuses an in-place update of a saved output, and the
    # transient second [N, K] buffer is small (IN-21K: 32 x 10,450 floats).
    (grad,) = ctx.saved_tensors
    return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None


_soft_kl_div_op.register_autograd(_backward, setup_context=_setup_context)


def soft_kl_div_reference(student_logits, teacher_logits, temperature=1.0, scale_t2=False,
                          student_temperature=None) -> torch.Tensor:
    """The definition in plain torch ops, differentiated by autograd: the op's torch forward run outside
    the op (the tests' oracle for the Triton kernels and the closed-form gradient; float32, or float64)."""
    student_temperature = temperature if student_temperature is None else student_temperature
    return _torch_forward(student_logits, teacher_logits, temperature, student_temperature,
                          _scale(temperature, scale_t2), False)[0]


def _scale(temperature: float, scale_t2: bool) -> float:
    return temperature**2 if scale_t2 else 1.0


def soft_kl_div(student_logits, teacher_logits, temperature=1.0, scale_t2=False, backend=None,
                student_temperature=None) -> torch.Tensor:
    """batchmean KL(softmax(z_t / T) || softmax(z_s / T_s)), times T^2 if ``scale_t2``.

    ``temperature`` T is the teacher's; ``student_temperature`` T_s is T unless given (LPQLD's
    calibrated student). student_logits, teacher_logits: [N, K], any float dtype each (a float16
    teacher is read as is). The gradient flows to the student logits only; the teacher is a constant.
    """
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape or 0 in student_logits.shape:
        raise ValueError(
            f"expected student and teacher logits of the same shape [N, K] with N, K >= 1, "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    student_temperature = temperature if student_temperature is None else student_temperature
    if not temperature > 0 or not student_temperature > 0:
        raise ValueError(f"temperatures must be positive, got teacher {temperature} and student {student_temperature}")
    need_grad = student_logits.requires_grad and torch.is_grad_enabled()
    return torch.ops.lpld.soft_kl_div(student_logits, teacher_logits.detach(), float(temperature),
                                      float(student_temperature), _scale(temperature, scale_t2), need_grad,
                                      _dispatch.use_triton(backend, student_logits))[0]


class SoftKLDivLoss(nn.Module):
    """Drop-in for ``nn.KLDivLoss(reduction="batchmean")`` on temperature-softened logits."""

    def __init__(self, temperature: float = 1.0, scale_t2: bool = False, backend: str | None = None,
                 student_temperature: float | None = None):
        super().__init__()
        self.temperature = temperature
        self.scale_t2 = scale_t2
        self.backend = backend
        self.student_temperature = student_temperature

    def forward(self, student_logits, teacher_logits):
        return soft_kl_div(student_logits, teacher_logits, self.temperature, self.scale_t2, self.backend,
                           self.student_temperature)

    def extra_repr(self) -> str:
        student = "" if self.student_temperature is None else f", student_temperature={self.student_temperature}"
        return f"temperature={self.temperature}{student}, scale_t2={self.scale_t2}, backend={self.backend!r}"

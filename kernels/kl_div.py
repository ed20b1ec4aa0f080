"""Temperature soft-label KL divergence, the FKD-style student loss (SPEC.md section 6).

    loss = scale / N * sum_i KL( softmax(z_t[i] / T) || softmax(z_s[i] / T) ),  scale = T^2 or 1

equals ``nn.KLDivLoss(reduction="batchmean")`` on log_softmax(z_s / T) and softmax(z_t / T), or on
log_softmax(z_t / T) with ``log_target=True`` (the Tiny recipe, times T^2). Teacher entries of
probability 0 (logit -inf) contribute 0, the 0 * log 0 = 0 convention.

The fused path runs one Triton program per row: a first sweep keeps an online max and sum of
exponentials per lane for both rows (combined once at the end), a second computes the exact log-probabilities, the row's loss and the
gradient w.r.t. z_s, ``scale / (N T) * (p_s - p_t)``, written during the forward. Backward only
scales that gradient; nothing of size [N, K] is kept besides it.
"""
import torch
import triton
import triton.language as tl
from torch import nn

from . import _dispatch

MAX_BLOCK_K = 4096


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
def _soft_kl_kernel(
    student_ptr, teacher_ptr, row_loss_ptr, grad_ptr,
    K, stride_student, stride_teacher, stride_grad, inv_temperature, grad_scale,
    BLOCK_K: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * stride_student
    teacher_row = teacher_ptr + row * stride_teacher
    max_s = tl.full([BLOCK_K], -float("inf"), dtype=tl.float32)
    max_t = tl.full([BLOCK_K], -float("inf"), dtype=tl.float32)
    sum_s = tl.zeros([BLOCK_K], dtype=tl.float32)
    sum_t = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        s = tl.load(student_row + k, mask=k < K, other=-float("inf")).to(tl.float32) * inv_temperature
        t = tl.load(teacher_row + k, mask=k < K, other=-float("inf")).to(tl.float32) * inv_temperature
        max_s, sum_s = _log_sum_exp_step(max_s, sum_s, s)
        max_t, sum_t = _log_sum_exp_step(max_t, sum_t, t)
    lse_s = _log_sum_exp_finish(max_s, sum_s)
    lse_t = _log_sum_exp_finish(max_t, sum_t)
    loss = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        s = tl.load(student_row + k, mask=k < K, other=0.0).to(tl.float32) * inv_temperature
        t = tl.load(teacher_row + k, mask=k < K, other=-float("inf")).to(tl.float32) * inv_temperature
        log_p_s = tl.minimum(s - lse_s, 0.0)  # <= 0 anyway; keeps masked lanes (s = 0) from overflowing
        log_p_t = t - lse_t
        p_t = tl.exp(log_p_t)
        loss += p_t * tl.where(p_t > 0.0, log_p_t - log_p_s, 0.0)
        if WRITE_GRAD:
            grad = (tl.exp(log_p_s) - p_t) * grad_scale
            tl.store(grad_ptr + row * stride_grad + k, grad.to(grad_ptr.dtype.element_ty), mask=k < K)
    tl.store(row_loss_ptr + row, tl.sum(loss, axis=0))


class SoftKLDiv(torch.autograd.Function):
    """(z_s, z_t, T, scale) -> scalar loss; the gradient w.r.t. z_s is computed in the forward."""

    @staticmethod
    def forward(ctx, student, teacher, temperature, scale):
        student = student if student.stride(1) == 1 else student.contiguous()
        teacher = teacher if teacher.stride(1) == 1 else teacher.contiguous()
        rows, classes = student.shape
        write_grad = ctx.needs_input_grad[0]
        row_loss = _dispatch.empty((rows,), dtype=torch.float32, device=student.device)
        grad = _dispatch.empty((rows, classes), dtype=student.dtype, device=student.device) if write_grad else None
        block_k = min(triton.next_power_of_2(classes), MAX_BLOCK_K)
        _soft_kl_kernel[(rows,)](
            student, teacher, row_loss, grad if write_grad else row_loss,
            classes, student.stride(0), teacher.stride(0), classes, 1.0 / temperature,
            scale / (rows * temperature),
            BLOCK_K=block_k, WRITE_GRAD=write_grad, num_warps=4 if block_k <= 1024 else 8,
        )
        ctx.save_for_backward(grad)
        return row_loss.sum() * (scale / rows)

    @staticmethod
    def backward(ctx, grad_output):
        # In place, so backward adds no [N, K] buffer; a second backward through a retained graph
        # then fails loudly (autograd's saved-tensor version check) instead of scaling twice.
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None


def soft_kl_div_reference(student_logits, teacher_logits, temperature=1.0, scale_t2=False) -> torch.Tensor:
    """Plain PyTorch twin of ``SoftKLDiv`` (float32, or float64 for float64 inputs)."""
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    log_p_s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_p_t = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    p_t = log_p_t.exp()
    pointwise = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), 0.0)
    return pointwise.sum() * (_scale(temperature, scale_t2) / student_logits.shape[0])


def _scale(temperature: float, scale_t2: bool) -> float:
    return temperature**2 if scale_t2 else 1.0


def soft_kl_div(student_logits, teacher_logits, temperature=1.0, scale_t2=False, backend=None) -> torch.Tensor:
    """batchmean KL(softmax(z_t / T) || softmax(z_s / T)), times T^2 if ``scale_t2``.

    student_logits, teacher_logits: [N, K], any float dtype each (a float16 teacher is read as
    is). The gradient flows to the student logits only; the teacher is a constant.
    """
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape or 0 in student_logits.shape:
        raise ValueError(
            f"expected student and teacher logits of the same shape [N, K] with N, K >= 1, "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if _dispatch.use_triton(backend, student_logits):
        return SoftKLDiv.apply(student_logits, teacher_logits.detach(), temperature, _scale(temperature, scale_t2))
    return soft_kl_div_reference(student_logits, teacher_logits.detach(), temperature, scale_t2)


class SoftKLDivLoss(nn.Module):
    """Drop-in for ``nn.KLDivLoss(reduction="batchmean")`` on temperature-softened logits."""

    def __init__(self, temperature: float = 1.0, scale_t2: bool = False, backend: str | None = None):
        super().__init__()
        self.temperature = temperature
        self.scale_t2 = scale_t2
        self.backend = backend

    def forward(self, student_logits, teacher_logits):
        return soft_kl_div(student_logits, teacher_logits, self.temperature, self.scale_t2, self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, scale_t2={self.scale_t2}, backend={self.backend!r}"

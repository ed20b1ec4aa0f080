"""soft_kl_div / SoftKLDivLoss: the Triton kernel (interpreted on CPU) and the torch path against
float64, plus the drop-in promise against torch.nn.KLDivLoss(reduction="batchmean").

The kernel reads the logits in their own dtype and computes in float32, so the loss is held to
float32 accuracy for every dtype; the gradient is stored in the student's dtype, so its bound is
that dtype's rounding.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import lpld_kernels
from lpld_kernels.kl_div import soft_kl_div_reference

LOSS_RTOL = 1e-4
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}

pytestmark = pytest.mark.usefixtures("poisoned_kernel_buffers")


def make_logits(rows, classes, student_dtype=torch.float32, teacher_dtype=torch.float16, spread=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, classes, generator=gen) * spread).to(student_dtype)
    teacher = (torch.randn(rows, classes, generator=gen) * spread).to(teacher_dtype)
    return student, teacher


def loss_and_grad(student, teacher, temperature, scale_t2, backend):
    student = student.detach().requires_grad_()
    loss = lpld_kernels.soft_kl_div(student, teacher, temperature, scale_t2, backend=backend)
    (grad,) = torch.autograd.grad(loss, student)
    return loss, grad


def assert_matches_float64(student, teacher, temperature=1.0, scale_t2=False, backend="triton"):
    loss, grad = loss_and_grad(student, teacher, temperature, scale_t2, backend)
    ref_loss, ref_grad = loss_and_grad(student.double(), teacher.double(), temperature, scale_t2, "torch")
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=LOSS_RTOL, atol=1e-6)
    rtol = GRAD_RTOL[student.dtype]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol * ref_grad.abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature, scale_t2", [(1.0, False), (20.0, False), (4.0, True)])
def test_loss_and_grad_match_float64(backend, student_dtype, teacher_dtype, temperature, scale_t2):
    student, teacher = make_logits(6, 37, student_dtype, teacher_dtype)
    assert_matches_float64(student, teacher, temperature, scale_t2, backend)


@settings(max_examples=20, deadline=None)
@given(
    rows=st.integers(1, 8), classes=st.integers(1, 300), temperature=st.floats(0.5, 20.0),
    scale_t2=st.booleans(), student_dtype=st.sampled_from(list(GRAD_RTOL)), seed=st.integers(0, 2**16),
)
def test_random_shapes_match_float64(rows, classes, temperature, scale_t2, student_dtype, seed):
    assert_matches_float64(*make_logits(rows, classes, student_dtype, seed=seed), temperature, scale_t2)


@pytest.mark.parametrize("rows, classes", [(1, 10), (3, 10), (2, 10450)])
def test_class_counts_of_the_recipes(rows, classes):
    """K = 10 (Fashion-MNIST) and K = 10450 (ImageNet-21K-P, several K-blocks per row)."""
    assert_matches_float64(*make_logits(rows, classes), temperature=20.0)


def test_extreme_logits():
    """Logits of 1e4 in float32 and float16, and teacher rows with -inf (probability 0) entries."""
    student, teacher = make_logits(4, 50, teacher_dtype=torch.float32)
    student[0, 3], teacher[0, 3] = 1e4, 1e4
    student[1, :], teacher[1, 7] = -1e4, 1e4
    teacher[2, ::2] = float("-inf")
    teacher[3, :] = float("-inf")
    teacher[3, 11] = 0.0
    assert_matches_float64(student, teacher)
    assert_matches_float64(student.half(), teacher.half(), temperature=2.0)


def test_teacher_zero_probabilities_contribute_nothing():
    student, teacher = make_logits(2, 12, teacher_dtype=torch.float32)
    masked = teacher.clone()
    masked[:, 6:] = float("-inf")
    loss = lpld_kernels.soft_kl_div(student, masked, backend="triton")
    p_t = torch.softmax(teacher[:, :6].double(), 1)
    log_p_s = torch.log_softmax(student.double(), 1)[:, :6]
    expected = (p_t * (p_t.log() - log_p_s)).sum() / 2
    torch.testing.assert_close(loss.double(), expected, rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("log_target", [False, True])
def test_drop_in_for_torch_kl_div_loss(backend, log_target):
    """SPEC.md section 6: IN-1K/21K use softmax targets, Tiny log targets times T^2."""
    temperature, scale_t2 = (4.0, True) if log_target else (20.0, False)
    student, teacher = make_logits(16, 100, teacher_dtype=torch.float32, spread=10.0, seed=3)
    student_ours = student.clone().requires_grad_()
    student_torch = student.clone().requires_grad_()
    ours = lpld_kernels.SoftKLDivLoss(temperature, scale_t2, backend)(student_ours, teacher)
    log_p_s = torch.log_softmax(student_torch / temperature, dim=1)
    target = (torch.log_softmax if log_target else torch.softmax)(teacher / temperature, dim=1)
    theirs = torch.nn.KLDivLoss(reduction="batchmean", log_target=log_target)(log_p_s, target)
    theirs = theirs * (temperature**2 if scale_t2 else 1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(student_ours.grad, student_torch.grad, rtol=1e-4, atol=1e-7)


def test_backward_scales_by_grad_output_and_refuses_a_second_pass():
    student, teacher = make_logits(3, 20, teacher_dtype=torch.float32)
    student.requires_grad_()
    loss = lpld_kernels.soft_kl_div(student, teacher, backend="triton")
    (3 * loss).backward(retain_graph=True)
    ref = student.detach().double().requires_grad_()
    (3 * soft_kl_div_reference(ref, teacher.double())).backward()
    torch.testing.assert_close(student.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_constant_student_needs_no_gradient_buffer():
    student, teacher = make_logits(3, 20)
    loss = lpld_kernels.soft_kl_div(student, teacher, 2.0, backend="triton")
    torch.testing.assert_close(loss.double(), soft_kl_div_reference(student.double(), teacher.double(), 2.0))


def test_strided_rows_are_read_in_place():
    student, teacher = make_logits(4, 64, teacher_dtype=torch.float32)
    assert_matches_float64(student[::2, :30], teacher[1::2, 5:35])


def test_reference_passes_gradcheck():
    student, teacher = make_logits(3, 7, torch.float64, torch.float64)
    torch.autograd.gradcheck(
        lambda s: soft_kl_div_reference(s, teacher, 3.0, True), student.requires_grad_()
    )


@pytest.mark.parametrize("student_shape, teacher_shape", [((2, 5), (2, 6)), ((2, 5, 1), (2, 5, 1)), ((0, 5), (0, 5))])
def test_bad_shapes_are_refused(student_shape, teacher_shape):
    with pytest.raises(ValueError, match="same shape"):
        lpld_kernels.soft_kl_div(torch.zeros(student_shape), torch.zeros(teacher_shape))


def test_kernel_compiles_for_a_gpu(compile_for_gpu):
    variants = [
        ["_soft_kl_kernel", {"student_ptr": f"*{student}", "teacher_ptr": "*fp16", "row_loss_ptr": "*fp32",
                             "grad_ptr": f"*{student}", "inv_temperature": "fp32", "grad_scale": "fp32"},
         {"BLOCK_K": block, "WRITE_GRAD": write_grad}]
        for student in ["fp32", "bf16"] for block, write_grad in [(16, True), (4096, True), (1024, False)]
    ]
    compile_for_gpu("lpld_kernels.kl_div", variants)

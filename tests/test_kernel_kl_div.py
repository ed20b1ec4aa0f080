"""soft_kl_div / SoftKLDivLoss: the Triton kernels (compiled on a GPU, interpreted on the CPU) and the
op's torch backend against float64 autograd, plus the drop-in promise against
torch.nn.KLDivLoss(reduction="batchmean").

The kernel reads the logits in their own dtype and computes in float32, so the loss is held to
float32 accuracy for every dtype; the gradient is stored in the student's dtype, so its bound is
that dtype's rounding.
"""
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lpld_kernels
from lpld_kernels import kl_div
from lpld_kernels.kl_div import soft_kl_div_reference

LOSS_RTOL = 1e-4
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}

pytestmark = pytest.mark.usefixtures("poisoned_kernel_buffers")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # compiled kernels, or the interpreter


def make_logits(rows, classes, student_dtype=torch.float32, teacher_dtype=torch.float16, spread=3.0, seed=0,
                device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, classes, generator=gen) * spread).to(student_dtype)
    teacher = (torch.randn(rows, classes, generator=gen) * spread).to(teacher_dtype)
    return student.to(device), teacher.to(device)


def loss_and_grad(student, teacher, temperature, scale_t2, backend, student_temperature=None):
    student = student.detach().requires_grad_()
    loss = lpld_kernels.soft_kl_div(student, teacher, temperature, scale_t2, backend=backend,
                                    student_temperature=student_temperature)
    (grad,) = torch.autograd.grad(loss, student)
    return loss, grad


def assert_matches_float64(student, teacher, temperature=1.0, scale_t2=False, backend="triton", student_temperature=None):
    loss, grad = loss_and_grad(student, teacher, temperature, scale_t2, backend, student_temperature)
    ref_student = student.detach().cpu().double().requires_grad_()
    ref_loss = soft_kl_div_reference(ref_student, teacher.cpu().double(), temperature, scale_t2, student_temperature)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_student)
    assert loss.dtype == torch.float32 and grad.dtype == student.dtype and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=LOSS_RTOL, atol=1e-6)
    rtol = GRAD_RTOL[student.dtype]
    torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=rtol, atol=rtol * ref_grad.abs().max().item())


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
    student_temperature=st.one_of(st.none(), st.floats(0.05, 20.0)),
    scale_t2=st.booleans(), student_dtype=st.sampled_from(list(GRAD_RTOL)), seed=st.integers(0, 2**16),
    programs=st.sampled_from([1, 64]),
)
def test_random_shapes_match_float64(rows, classes, temperature, student_temperature, scale_t2, student_dtype, seed,
                                     programs):
    """``programs=64`` (with 16-column slices) cuts K into slices the way a GPU launch does for few rows."""
    with mock.patch.object(kl_div, "wanted_programs", lambda device: programs), \
            mock.patch.object(kl_div, "MIN_SLICE_K", 16):
        assert_matches_float64(*make_logits(rows, classes, student_dtype, seed=seed), temperature, scale_t2,
                               student_temperature=student_temperature)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("programs", [1, 64], ids=["one-slice", "k-slices"])
def test_separate_student_temperature_is_the_written_out_definition(backend, programs):
    """KL(softmax(z_t / T_t) || softmax(z_s / T_s)) and its gradient (p_s - p_t) / (N T_s), written out in
    float64 here; T^2 scaling squares the teacher's temperature; equal temperatures are the one-T call."""
    student, teacher = make_logits(5, 300, teacher_dtype=torch.float32)
    s, t = student.cpu().double(), teacher.cpu().double()
    for teacher_temperature, student_temperature, scale_t2 in ((20.0, 0.37, False), (4.0, 1.0, True), (2.0, 8.0, False)):
        p_t = torch.softmax(t / teacher_temperature, 1)
        log_p_s = torch.log_softmax(s / student_temperature, 1)
        scale = teacher_temperature**2 if scale_t2 else 1.0
        expected = scale * (p_t * (p_t.log() - log_p_s)).sum() / 5
        expected_grad = scale * (log_p_s.exp() - p_t) / (5 * student_temperature)
        with mock.patch.object(kl_div, "wanted_programs", lambda device: programs), \
                mock.patch.object(kl_div, "MIN_SLICE_K", 64):
            loss, grad = loss_and_grad(student, teacher, teacher_temperature, scale_t2, backend, student_temperature)
        torch.testing.assert_close(loss.double().cpu(), expected, rtol=LOSS_RTOL, atol=1e-7)
        torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=1e-4, atol=1e-4 * expected_grad.abs().max().item())
    same, _ = loss_and_grad(student, teacher, 3.0, False, backend, 3.0)
    one_t, _ = loss_and_grad(student, teacher, 3.0, False, backend)
    assert torch.equal(same, one_t)
    with pytest.raises(ValueError, match="temperatures must be positive"):
        lpld_kernels.soft_kl_div(student, teacher, 2.0, student_temperature=0.0)
    module = lpld_kernels.SoftKLDivLoss(20.0, student_temperature=0.5, backend=backend)
    torch.testing.assert_close(module(student, teacher), soft_kl_div_reference(student, teacher, 20.0, False, 0.5),
                               rtol=LOSS_RTOL, atol=1e-7)
    assert "student_temperature=0.5" in repr(module)


@pytest.mark.parametrize("rows, classes", [(1, 10), (3, 10), (2, 10450)])
@pytest.mark.parametrize("programs", [1, 528], ids=["cpu", "h100-like"])
def test_class_counts_of_the_recipes(rows, classes, programs):
    """K = 10 (Fashion-MNIST) and K = 10450 (ImageNet-21K-P: several K-blocks per row, and on a GPU
    launch several K slices per row)."""
    with mock.patch.object(kl_div, "wanted_programs", lambda device: programs):
        assert_matches_float64(*make_logits(rows, classes), temperature=20.0)


def test_small_batches_slice_k_to_fill_a_gpu():
    """IN-21K's N = 32, K = 10,450 on an H100 (528 programs wanted): K in 6 slices of 2048."""
    assert kl_div.launch_config(32, 10450, 528) == (6, 2048, 2048, 16)
    assert kl_div.launch_config(128, 1000, 528)[0] == 1  # IN-1K: rows alone are enough per slice rule
    assert kl_div.launch_config(32, 10450, 1)[0] == 1  # the interpreter: one slice


def test_teacher_rows_with_an_empty_slice():
    """A K slice where the teacher is all -inf contributes nothing and breaks no merge."""
    student, teacher = make_logits(2, 3000, teacher_dtype=torch.float32)
    teacher[:, 2048:] = float("-inf")  # the second slice, [2048, 3000), has no teacher mass at all
    with mock.patch.object(kl_div, "wanted_programs", lambda device: 64):
        assert kl_div.launch_config(2, 3000, 64)[0] == 2
        assert_matches_float64(student, teacher, temperature=4.0)


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


def test_backward_scales_by_grad_output_and_allows_a_second_pass():
    student, teacher = make_logits(3, 20, teacher_dtype=torch.float32)
    student.requires_grad_()
    loss = lpld_kernels.soft_kl_div(student, teacher, backend="triton")
    (3 * loss).backward(retain_graph=True)
    ref = student.detach().double().requires_grad_()
    (3 * soft_kl_div_reference(ref, teacher.double())).backward()
    torch.testing.assert_close(student.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)
    loss.backward()  # the saved gradient was not scaled in place: this adds 1x, for 4x in all
    torch.testing.assert_close(student.grad.double(), ref.grad * 4 / 3, rtol=1e-4, atol=1e-7)


def test_constant_student_needs_no_gradient_buffer():
    student, teacher = make_logits(3, 20)
    loss = lpld_kernels.soft_kl_div(student, teacher, 2.0, backend="triton")
    torch.testing.assert_close(loss.double(), soft_kl_div_reference(student.double(), teacher.double(), 2.0))
    _, grad = torch.ops.lpld.soft_kl_div(student, teacher, 2.0, 2.0, 1.0, False, True)
    assert grad.numel() == 0


def test_strided_rows_are_read_in_place():
    student, teacher = make_logits(4, 64, teacher_dtype=torch.float32)
    assert_matches_float64(student[::2, :30], teacher[1::2, 5:35])


def test_reference_passes_gradcheck():
    student, teacher = make_logits(3, 7, torch.float64, torch.float64, device="cpu")
    torch.autograd.gradcheck(
        lambda s: soft_kl_div_reference(s, teacher, 3.0, True), student.requires_grad_()
    )


@pytest.mark.parametrize("student_shape, teacher_shape", [((2, 5), (2, 6)), ((2, 5, 1), (2, 5, 1)), ((0, 5), (0, 5))])
def test_bad_shapes_are_refused(student_shape, teacher_shape):
    with pytest.raises(ValueError, match="same shape"):
        lpld_kernels.soft_kl_div(torch.zeros(student_shape), torch.zeros(teacher_shape))


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_custom_op_passes_opcheck(use_triton):
    """Schema, fake (meta) implementation, registered autograd and AOT dispatch agree with the real op."""
    student, teacher = make_logits(3, 20, teacher_dtype=torch.float32)
    for need_grad in (True, False):
        args = (student.clone().requires_grad_(need_grad), teacher, 4.0, 0.5, 16.0, need_grad, use_triton)
        torch.library.opcheck(torch.ops.lpld.soft_kl_div.default, args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_student_has_no_graph_break(backend):
    """A compiled model + loss calls the op in one graph; loss and weight gradient equal eager."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)).to(DEVICE)
    images, teacher = torch.randn(4, 8, device=DEVICE), torch.randn(4, 10, device=DEVICE).half()

    def step(x, t):
        return lpld_kernels.soft_kl_div(model(x), t, temperature=20.0, backend=backend)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(images, teacher)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        loss = fn(images, teacher)
        loss.backward()
        results.append((loss.detach(), model[0].weight.grad.clone()))
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.gpu
@pytest.mark.parametrize("student_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, classes", [(128, 1000), (32, 10450)], ids=["in1k", "in21k-sliced"])
def test_recipe_shapes_on_cuda_match_float64(student_dtype, rows, classes):
    """The training shapes on the GPU, float16 stored teacher logits, T = 20."""
    assert_matches_float64(*make_logits(rows, classes, student_dtype, device="cuda"), temperature=20.0)

"""class_bn_loss: the Triton kernels (interpreted on CPU) and the torch path against float64.

The oracle is ``group_moments_reference`` evaluated in float64 on the very values the kernel read
(x cast to float64 after rounding to its dtype). The kernels accumulate in float32 whatever the
input dtype, so the loss is held to float32 accuracy for every dtype; the gradient is stored in
x's dtype, so its bound is that dtype's rounding.
"""
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lpld_kernels
from lpld_kernels import _dispatch
from lpld_kernels import bn_match

LOSS_RTOL = 1e-4
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}

pytestmark = pytest.mark.usefixtures("poisoned_kernel_buffers")


def make_inputs(batch, channels, height, width, num_groups, dtype=torch.float32, channels_last=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, channels, height, width, generator=gen) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    groups = torch.randint(0, num_groups, (batch,), generator=gen)
    target_mean = torch.randn(num_groups, channels, generator=gen)
    target_var = torch.rand(num_groups, channels, generator=gen) * 4
    return x, groups, target_mean, target_var


def loss_and_grad(x, groups, target_mean, target_var, rms=False, backend="triton"):
    x = x.detach().requires_grad_()
    loss = lpld_kernels.class_bn_loss(x, groups, target_mean, target_var, rms=rms, backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad


def assert_matches_float64(x, groups, target_mean, target_var, rms=False, backend="triton", grad_rtol=None):
    loss, grad = loss_and_grad(x, groups, target_mean, target_var, rms, backend)
    ref_loss, ref_grad = loss_and_grad(x.double(), groups, target_mean.double(), target_var.double(), rms, "torch")
    assert loss.dtype == torch.float32 and grad.dtype == x.dtype
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        assert grad.stride() == x.stride()
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=LOSS_RTOL, atol=1e-6)
    rtol = grad_rtol or GRAD_RTOL[x.dtype]
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=rtol * ref_grad.abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rms", [False, True])
def test_loss_and_grad_match_float64(backend, dtype, channels_last, rms):
    inputs = make_inputs(5, 6, 5, 7, num_groups=3, dtype=dtype, channels_last=channels_last)
    assert_matches_float64(*inputs, rms=rms, backend=backend)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 6), channels=st.integers(1, 20), height=st.integers(1, 9), width=st.integers(1, 9),
    num_groups=st.integers(1, 4), dtype=st.sampled_from(list(GRAD_RTOL)), channels_last=st.booleans(),
    rms=st.booleans(), seed=st.integers(0, 2**16), programs=st.sampled_from([1, 64]),
)
def test_random_shapes_match_float64(
    batch, channels, height, width, num_groups, dtype, channels_last, rms, seed, programs
):
    """``programs=64`` cuts HW into chunks the way a GPU launch does."""
    inputs = make_inputs(batch, channels, height, width, num_groups, dtype, channels_last, seed)
    with mock.patch.object(bn_match, "wanted_programs", lambda device: programs):
        assert_matches_float64(*inputs, rms=rms)


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (1, 5, 1, 1), (3, 1, 2, 3), (2, 3, 1, 9), (2, 3, 9, 1)])
def test_odd_sizes_with_one_group(shape):
    assert_matches_float64(*make_inputs(*shape, num_groups=1))


@pytest.mark.parametrize("programs", [1, 64], ids=["one-chunk", "gpu-like-chunks"])
def test_moments_survive_a_large_common_offset(programs, monkeypatch):
    """1000 + ramp + noise: naive float32 sums of squares would lose the variance entirely.

    HW = 2304 spans two tiles of 2048 with different means, so the in-kernel merge matters;
    ``programs=64`` splits HW into chunks as on a GPU, so the torch-side merge matters too.
    """
    monkeypatch.setattr(bn_match, "wanted_programs", lambda device: programs)
    gen = torch.Generator().manual_seed(1)
    ramp = torch.linspace(0, 0.1, 48)[:, None]
    x = 1000 + ramp + 0.01 * torch.randn(2, 3, 48, 48, generator=gen)
    groups = torch.tensor([0, 0])
    mean, var, count = bn_match.GroupMoments.apply(x, groups, 1)
    ref_mean, ref_var, _ = bn_match.group_moments_reference(x.double(), groups, 1)
    assert count.tolist() == [2]
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)
    # dx uses x - mu; float32 holds mu = 1000.0 only to 3e-5, i.e. 1e-3 of the spread.
    assert_matches_float64(x, groups, ref_mean.float() + 1, ref_var.float() * 2, grad_rtol=1e-3)


def test_groups_without_samples_add_nothing():
    """Empty groups 0 and 3; group 3's zero targets equal its zero moments (a norm at 0)."""
    x, groups, target_mean, target_var = make_inputs(4, 5, 3, 3, num_groups=2)
    zeros = torch.zeros_like(target_mean[:1])
    with_empty, grad = loss_and_grad(
        x, groups + 1, torch.cat([target_mean[:1] + 7, target_mean, zeros]),
        torch.cat([target_var[:1] + 7, target_var, zeros]),
    )
    without, ref_grad = loss_and_grad(x, groups, target_mean, target_var, backend="torch")
    torch.testing.assert_close(with_empty, without, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=GRAD_RTOL[torch.float32], atol=1e-7)


def test_empty_batch_gives_zero_loss_and_an_empty_gradient():
    x, groups, target_mean, target_var = make_inputs(0, 3, 4, 4, num_groups=2)
    loss, grad = loss_and_grad(x, groups, target_mean, target_var)
    assert loss.item() == 0 and grad.shape == x.shape


def test_rms_divides_each_norm_by_sqrt_channels():
    x, groups, target_mean, target_var = make_inputs(3, 9, 4, 4, num_groups=2)
    plain = lpld_kernels.class_bn_loss(x, groups, target_mean, target_var, backend="triton")
    rms = lpld_kernels.class_bn_loss(x, groups, target_mean, target_var, rms=True, backend="triton")
    torch.testing.assert_close(rms * math.sqrt(9), plain)


def test_non_dense_input_is_handled():
    x, groups, target_mean, target_var = make_inputs(4, 6, 6, 8, num_groups=2)
    assert_matches_float64(x[:, :, ::2, 1:], groups, target_mean, target_var)


def test_gradient_reaches_the_image_through_forward_hooks():
    """The recover loop's use: hooks on BN layers add the loss, the optimized image gets dL/dx."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 3), torch.nn.BatchNorm2d(6),
    ).eval()
    groups = torch.tensor([1, 0, 1])
    targets = {bn: (torch.randn(2, bn.num_features), torch.rand(2, bn.num_features)) for bn in model[1::3]}

    def image_grad(image, backend):
        losses = []
        hooks = [
            bn.register_forward_hook(
                lambda module, inputs, _, backend=backend: losses.append(
                    lpld_kernels.class_bn_loss(inputs[0], groups, *targets[module], backend=backend)
                )
            )
            for bn in targets
        ]
        image = image.detach().requires_grad_()
        model(image)
        for hook in hooks:
            hook.remove()
        (grad,) = torch.autograd.grad(sum(losses), image)
        return grad

    image = torch.randn(3, 3, 7, 7)
    fused = image_grad(image, "triton")
    model.double()
    targets = {bn: tuple(t.double() for t in pair) for bn, pair in targets.items()}
    reference = image_grad(image.double(), "torch")
    torch.testing.assert_close(fused.double(), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_reference_passes_gradcheck():
    x, groups, target_mean, target_var = make_inputs(3, 4, 3, 2, num_groups=2)
    torch.autograd.gradcheck(
        lambda x: lpld_kernels.class_bn_loss(
            x, groups, target_mean.double(), target_var.double(), rms=True, backend="torch"
        ),
        x.double().requires_grad_(),
    )


def test_poisoned_allocator_is_active():
    buffer = _dispatch.empty((3,), dtype=torch.float32, device=torch.device("cpu"))
    assert torch.isnan(buffer).all()


@pytest.mark.parametrize(
    "x_shape, groups_shape, target_shape",
    [((2, 3, 4), (2,), (1, 3)), ((2, 3, 4, 4), (3,), (1, 3)), ((2, 3, 4, 4), (2,), (1, 4))],
)
def test_bad_shapes_are_refused(x_shape, groups_shape, target_shape):
    with pytest.raises(ValueError, match="expected"):
        lpld_kernels.class_bn_loss(
            torch.zeros(x_shape), torch.zeros(groups_shape, dtype=torch.int64),
            torch.zeros(target_shape), torch.zeros(target_shape),
        )


def test_backend_choice(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    assert not _dispatch.use_triton(None, cpu)
    assert _dispatch.use_triton("triton", cpu) and not _dispatch.use_triton("torch", cpu)
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert _dispatch.use_triton(None, cpu)
    assert not _dispatch.use_triton("torch", cpu)
    with mock.patch.object(bn_match.GroupMoments, "apply", wraps=bn_match.GroupMoments.apply) as fused:
        lpld_kernels.class_bn_loss(*make_inputs(2, 3, 2, 2, num_groups=1))
    assert fused.called
    with pytest.raises(ValueError, match="unknown kernel backend"):
        _dispatch.use_triton("cuda", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.use_triton("triton", cpu)


def test_kernels_compile_for_a_gpu(compile_for_gpu):
    """Every input dtype, NCHW (stride_hw == 1 specialized) and channels_last (stride_c == 1)."""
    variants = []
    for dtype in ["fp32", "bf16", "fp16"]:
        for layout in [{"stride_hw": 1, "BLOCK_C": 1, "BLOCK_HW": 2048}, {"stride_c": 1, "BLOCK_C": 64, "BLOCK_HW": 32}]:
            variants.append(["_partial_moments_kernel", {"x_ptr": f"*{dtype}", "mean_ptr": "*fp32", "m2_ptr": "*fp32"}, layout])
            variants.append(["_moments_backward_kernel", {
                "x_ptr": f"*{dtype}", "dx_ptr": f"*{dtype}", "groups_ptr": "*i64", "mean_ptr": "*fp32",
                "coef_mean_ptr": "*fp32", "coef_var_ptr": "*fp32"}, layout])
    compile_for_gpu("lpld_kernels.bn_match", variants)

"""class_bn_loss / class_bn_loss_layers: the Triton kernels (compiled on a GPU, interpreted on the CPU)
and the op's torch backend against the definition in float64 autograd.

The oracle is ``class_bn_loss_reference`` evaluated in float64 on the very values the kernels read
(x cast to float64 after rounding to its dtype). The kernels accumulate in float32 whatever the
input dtype, so the loss is held to float32 accuracy for every dtype; the gradient is stored in
x's dtype, so its bound is that dtype's rounding.
"""
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import lpld_kernels
from lpld_kernels import _dispatch, bn_match

LOSS_RTOL = 1e-4
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
RESNET18_BN_INPUTS_32PX = [(64, 16)] + [(64, 8)] * 4 + [(128, 4)] * 5 + [(256, 2)] * 5 + [(512, 1)] * 5  # (C, side)

pytestmark = pytest.mark.usefixtures("poisoned_kernel_buffers")
UNPOISONED_EMPTY = _dispatch.empty
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # compiled kernels, or the interpreter


def make_layers(batch, shapes, num_rows, dtype=torch.float32, channels_last=False, seed=0, device=DEVICE):
    """BN inputs [batch, C, H, W] per (C, H, W) in ``shapes`` and target tables [num_rows, sum C]."""
    gen = torch.Generator().manual_seed(seed)
    xs = [(torch.randn(batch, c, h, w, generator=gen) * 2 + 0.5).to(dtype) for c, h, w in shapes]
    if channels_last:
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    total = sum(c for c, _, _ in shapes)
    target_mean = torch.randn(num_rows, total, generator=gen)
    target_var = torch.rand(num_rows, total, generator=gen) * 4
    return [x.to(device) for x in xs], target_mean.to(device), target_var.to(device)


def loss_and_grads(xs, groups, target_mean, target_var, weights, rows=None, rms=False, backend="triton"):
    xs = [x.detach().requires_grad_() for x in xs]
    device = xs[0].device if xs else DEVICE
    groups, target_mean, target_var = groups.to(device), target_mean.to(device), target_var.to(device)
    rows = None if rows is None else rows.to(device)
    if backend == "reference":
        loss = bn_match.class_bn_loss_reference(xs, groups, target_mean, target_var, weights, rows, rms=rms)
    else:
        loss = lpld_kernels.class_bn_loss_layers(xs, groups, target_mean, target_var, weights, rows, rms=rms,
                                                 backend=backend)
    return loss, torch.autograd.grad(loss, xs)


def assert_matches_float64(xs, groups, target_mean, target_var, weights=None, rows=None, rms=False,
                           backend="triton", grad_rtol=None, same_strides=True):
    weights = weights or [1.0] * len(xs)
    loss, grads = loss_and_grads(xs, groups, target_mean, target_var, weights, rows, rms, backend)
    ref_loss, ref_grads = loss_and_grads([x.cpu().double() for x in xs], groups.cpu(), target_mean.cpu().double(),
                                         target_var.cpu().double(), weights, None if rows is None else rows.cpu(),
                                         rms, "reference")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=LOSS_RTOL, atol=1e-6)
    for x, grad, ref_grad in zip(xs, grads, ref_grads):
        assert grad.dtype == x.dtype and torch.isfinite(grad).all()
        if same_strides and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            assert grad.stride() == x.stride()
        rtol = grad_rtol or GRAD_RTOL[x.dtype]
        torch.testing.assert_close(grad.double().cpu(), ref_grad, rtol=rtol, atol=rtol * ref_grad.abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("rms", [False, True])
def test_one_layer_matches_float64(backend, dtype, channels_last, rms):
    (x,), target_mean, target_var = make_layers(5, [(6, 5, 7)], 3, dtype, channels_last)
    groups = torch.tensor([2, 0, 2, 1, 0])
    assert_matches_float64([x], groups, target_mean, target_var, rms=rms, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layers_with_rows_and_weights_match_float64(backend, dtype, channels_last):
    """Recover's call: layers of different C and HW in one launch, groups mapped to table rows,
    the first layer weighted 10."""
    xs, target_mean, target_var = make_layers(4, [(3, 6, 5), (8, 3, 3), (5, 2, 7), (16, 1, 1)], 6, dtype,
                                              channels_last)
    groups, rows = torch.tensor([1, 0, 1, 2]), torch.tensor([5, 0, 3])
    assert_matches_float64(xs, groups, target_mean, target_var, [10.0, 1.0, 1.0, 0.5], rows, backend=backend)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 5), layers=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 9), st.integers(1, 9)),
                                             min_size=1, max_size=3),
    num_groups=st.integers(1, 4), dtype=st.sampled_from(list(GRAD_RTOL)), channels_last=st.booleans(),
    rms=st.booleans(), seed=st.integers(0, 2**16), tile=st.sampled_from([None, 1]),
)
def test_random_shapes_match_float64(batch, layers, num_groups, dtype, channels_last, rms, seed, tile):
    """``tile=1`` cuts HW into one-block chunks the way a GPU launch does, so the merge sees many."""
    xs, target_mean, target_var = make_layers(batch, layers, num_groups, dtype, channels_last, seed)
    groups = torch.randint(0, num_groups, (batch,), generator=torch.Generator().manual_seed(seed))
    bn_match.make_plan.cache_clear()
    original = bn_match.tile_elements
    bn_match.tile_elements = lambda device: tile
    try:
        assert_matches_float64(xs, groups, target_mean, target_var, [1.5] * len(xs), rms=rms)
    finally:
        bn_match.tile_elements = original
        bn_match.make_plan.cache_clear()


def _at_element(x: torch.Tensor, start: int) -> torch.Tensor:
    """A copy of ``x`` (same strides) in memory that begins ``start`` elements past an aligned allocation."""
    buffer = torch.empty(x.numel() + start, dtype=x.dtype, device=x.device)[start:]
    return buffer.as_strided(x.shape, x.stride()).copy_(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inputs_off_a_vector_boundary_take_the_unhinted_variant(dtype, channels_last):
    """Layers whose fast axis is a multiple of a vector (HW 16, C 8 and 16; HW 4 in float32 only) and
    one that is not (HW 9, C 3): from fresh tensors the aligned variant (VEC > 1, each layer on its
    own path), from views one element in the variant without alignment hints (VEC = 1); both equal
    float64."""
    xs, target_mean, target_var = make_layers(4, [(8, 4, 4), (3, 3, 3), (16, 2, 2)], 3, dtype, channels_last)
    groups, rows = torch.tensor([0, 0, 2, 1]), torch.tensor([1, 2, 0])
    plan = bn_match._plan(xs)
    assert bn_match._vector(plan, xs) == 16 // xs[0].element_size() > 1
    assert plan.layers[:, 6].tolist() == [1, 0, 1 if channels_last or dtype == torch.float32 else 0]
    assert_matches_float64(xs, groups, target_mean, target_var, [3.0, 1.0, 1.0], rows)
    shifted = [_at_element(x, 1) for x in xs]
    assert bn_match._vector(bn_match._plan(shifted), shifted) == 1
    assert_matches_float64(shifted, groups, target_mean, target_var, [3.0, 1.0, 1.0], rows)


def test_contiguous_and_interleaved_groups_give_the_same_loss():
    """The merge reads a group's own samples when they are contiguous and scans the batch otherwise:
    the same samples in either order are the same loss and, per sample, the same gradient."""
    xs, target_mean, target_var = make_layers(7, [(70, 3, 3), (5, 4, 4)], 4)  # 70 channels: two merge blocks
    groups = torch.tensor([0, 0, 0, 2, 2, 3, 3])
    order = torch.tensor([3, 0, 5, 1, 6, 2, 4])  # interleaved: no group is contiguous
    contiguous_loss, contiguous_grads = loss_and_grads(xs, groups, target_mean, target_var, [1.0, 2.0])
    mixed_loss, mixed_grads = loss_and_grads([x[order.to(x.device)] for x in xs], groups[order], target_mean,
                                             target_var, [1.0, 2.0])
    torch.testing.assert_close(mixed_loss, contiguous_loss, rtol=1e-6, atol=0)
    for mixed, contiguous in zip(mixed_grads, contiguous_grads):
        torch.testing.assert_close(mixed, contiguous[order.to(contiguous.device)], rtol=1e-5, atol=1e-7)
    assert_matches_float64(xs, groups, target_mean, target_var, [1.0, 2.0])
    assert_matches_float64([x[order.to(x.device)] for x in xs], groups[order], target_mean, target_var, [1.0, 2.0])


@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (1, 5, 1, 1), (3, 1, 2, 3), (2, 3, 1, 9), (2, 3, 9, 1)])
def test_odd_sizes_with_one_group(shape):
    batch, *layer = shape
    xs, target_mean, target_var = make_layers(batch, [tuple(layer)], 1)
    assert_matches_float64(xs, torch.zeros(batch, dtype=torch.int64), target_mean, target_var)


@pytest.mark.parametrize("tile", [None, 1], ids=["whole-HW", "gpu-like-chunks"])
def test_moments_survive_a_large_common_offset(tile, monkeypatch):
    """1000 + ramp + noise: naive float32 sums of squares would lose the variance entirely.

    HW = 2304 spans several tile steps with different means, so the in-kernel merge matters;
    ``tile=1`` splits HW into chunks as on a GPU, so the merge kernel's Chan merge matters too.
    """
    monkeypatch.setattr(bn_match, "tile_elements", lambda device: tile)
    bn_match.make_plan.cache_clear()
    gen = torch.Generator().manual_seed(1)
    ramp = torch.linspace(0, 0.1, 48)[:, None]
    x = 1000 + ramp + 0.01 * torch.randn(2, 3, 48, 48, generator=gen)
    groups = torch.tensor([0, 0])
    ref_mean, ref_var, _ = bn_match.group_moments_reference(x.double(), groups, 1)
    zeros = torch.zeros(1, 3, device=DEVICE)
    _, mean, diff_mean, diff_var, _, elements = torch.ops.lpld.class_bn_loss(
        [x.to(DEVICE)], groups.to(DEVICE), zeros, zeros, None, [1.0], False, True)
    bn_match.make_plan.cache_clear()
    mean, diff_var = mean.cpu(), diff_var.cpu()
    assert elements.tolist() == [[2 * 48 * 48]]
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    # Chan's merge keeps the variance to eps * |mean| / std of float32: 6e-5 * 1000 / 0.03, i.e. 2e-3
    # (naive sums of squares would lose it entirely).
    torch.testing.assert_close(diff_var.double(), ref_var, rtol=2e-3, atol=0)
    # dx uses x - mu; float32 holds mu = 1000.0 only to 3e-5, i.e. 1e-3 of the spread.
    assert_matches_float64([x.to(DEVICE)], groups, ref_mean.float() + 1, ref_var.float() * 2, grad_rtol=1e-3)


def test_groups_without_samples_add_nothing():
    """Empty groups 0 and 3; group 3's zero targets equal its zero moments (a norm at 0)."""
    xs, target_mean, target_var = make_layers(4, [(5, 3, 3)], 2)
    groups = torch.tensor([0, 1, 1, 0])
    zeros = torch.zeros_like(target_mean[:1])
    with_empty, grads = loss_and_grads(xs, groups + 1, torch.cat([target_mean[:1] + 7, target_mean, zeros]),
                                       torch.cat([target_var[:1] + 7, target_var, zeros]), [1.0])
    without, ref_grads = loss_and_grads(xs, groups, target_mean, target_var, [1.0], backend="reference")
    torch.testing.assert_close(with_empty, without, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=GRAD_RTOL[torch.float32], atol=1e-7)


def test_empty_batch_gives_zero_loss_and_an_empty_gradient():
    xs, target_mean, target_var = make_layers(0, [(3, 4, 4), (2, 2, 2)], 2)
    loss, grads = loss_and_grads(xs, torch.zeros(0, dtype=torch.int64), target_mean, target_var, [1.0, 1.0])
    assert loss.item() == 0 and [g.shape for g in grads] == [x.shape for x in xs]


def test_rms_divides_each_norm_by_sqrt_channels():
    (x,), target_mean, target_var = make_layers(3, [(9, 4, 4)], 2)
    groups = torch.tensor([0, 1, 1], device=DEVICE)
    plain = lpld_kernels.class_bn_loss(x, groups, target_mean, target_var, backend="triton")
    rms = lpld_kernels.class_bn_loss(x, groups, target_mean, target_var, rms=True, backend="triton")
    torch.testing.assert_close(rms * math.sqrt(9), plain)


def test_first_layer_weight_reaches_the_loss():
    """Recover's w = 10 on the first BN must scale that layer's term and only that one."""
    xs, target_mean, target_var = make_layers(3, [(4, 3, 3), (6, 2, 2)], 2)
    groups = torch.tensor([0, 1, 1], device=DEVICE)
    per_layer = [lpld_kernels.class_bn_loss(x, groups, target_mean[:, columns], target_var[:, columns])
                 for x, columns in zip(xs, (slice(0, 4), slice(4, 10)))]
    weighted = lpld_kernels.class_bn_loss_layers(xs, groups, target_mean, target_var, [10.0, 1.0], backend="triton")
    torch.testing.assert_close(weighted, 10 * per_layer[0] + per_layer[1])


@pytest.mark.parametrize("rms", [False, True])
def test_reference_is_the_definition_written_out(rms):
    """The oracle against SPEC.md section 5 spelled out one layer and one group at a time: w_l times
    the unsquared L2 norms of (target mean - mean) and (target var - biased var) over (samples, H, W)
    of the group's samples, each divided by sqrt(C) with ``rms``; a group without samples adds 0."""
    xs, target_mean, target_var = make_layers(7, [(4, 3, 3), (6, 2, 5)], 4, device="cpu")
    xs = [x.double() for x in xs]
    target_mean, target_var = target_mean.double(), target_var.double()
    groups, rows, weights = torch.tensor([2, 0, 0, 2, 1, 0, 2]), torch.tensor([3, 0, 1, 2]), [10.0, 1.0]
    expected, first = 0.0, 0
    for x, weight in zip(xs, weights):
        channels = x.shape[1]
        for g in range(len(rows)):
            mine = x[groups == g]
            if not len(mine):
                continue
            values = mine.permute(1, 0, 2, 3).reshape(channels, -1)
            var, mean = torch.var_mean(values, dim=1, unbiased=False)
            row = rows[g]
            norms = (torch.linalg.vector_norm(target_mean[row, first:first + channels] - mean)
                     + torch.linalg.vector_norm(target_var[row, first:first + channels] - var))
            expected += weight * norms / (math.sqrt(channels) if rms else 1.0)
        first += channels
    got = bn_match.class_bn_loss_reference(xs, groups, target_mean, target_var, weights, rows, rms=rms)
    torch.testing.assert_close(got, torch.as_tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_non_dense_and_mixed_layout_inputs_are_handled():
    """Both go through one dense layout (a copy), so their gradients come back in that layout."""
    xs, target_mean, target_var = make_layers(4, [(6, 6, 8), (3, 4, 4)], 2)
    groups = torch.tensor([0, 1, 1, 0])
    assert_matches_float64([xs[0][:, :, ::2, 1:], xs[1].to(memory_format=torch.channels_last)], groups,
                           target_mean, target_var, same_strides=False)


def test_gradient_reaches_the_image_through_forward_hooks():
    """The recover loop's use: hooks keep the BN inputs, one call matches all of them, the optimized
    image gets dL/dx."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 3), torch.nn.BatchNorm2d(6),
    ).eval().to(DEVICE)
    groups = torch.tensor([1, 0, 1], device=DEVICE)
    target_mean, target_var = torch.randn(2, 14, device=DEVICE), torch.rand(2, 14, device=DEVICE)

    def image_grad(image, backend):
        inputs = []
        hooks = [bn.register_forward_hook(lambda module, args, _: inputs.append(args[0])) for bn in model[1::3]]
        image = image.detach().requires_grad_()
        model(image)
        for hook in hooks:
            hook.remove()
        mean, var = target_mean.to(image.dtype), target_var.to(image.dtype)
        if backend == "reference":
            loss = bn_match.class_bn_loss_reference(inputs, groups, mean, var, [10.0, 1.0])
        else:
            loss = lpld_kernels.class_bn_loss_layers(inputs, groups, mean, var, [10.0, 1.0], backend=backend)
        (grad,) = torch.autograd.grad(loss, image)
        return grad

    image = torch.randn(3, 3, 7, 7, device=DEVICE)
    fused = image_grad(image, "triton")
    model.double()
    reference = image_grad(image.double(), "reference")
    torch.testing.assert_close(fused.double(), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_custom_op_passes_opcheck(use_triton):
    """Schema, fake (meta) implementation, registered autograd and AOT dispatch agree with the real op."""
    xs, target_mean, target_var = make_layers(3, [(4, 3, 3), (6, 2, 2)], 3)
    xs = [x.requires_grad_() for x in xs]
    args = (xs, torch.tensor([0, 2, 0], device=DEVICE), target_mean, target_var, torch.tensor([2, 1, 0], device=DEVICE),
            [10.0, 1.0], False, use_triton)
    torch.library.opcheck(torch.ops.lpld.class_bn_loss.default, args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_caller_has_no_graph_break(backend):
    """A user's compiled function calls the op in one graph; values and gradients equal eager."""
    xs, target_mean, target_var = make_layers(3, [(4, 3, 3), (6, 2, 2)], 2)
    groups = torch.tensor([0, 1, 1], device=DEVICE)

    def step(a, b):
        return 2 * lpld_kernels.class_bn_loss_layers([a.relu(), b], groups, target_mean, target_var, [10.0, 1.0],
                                                     backend=backend)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(*xs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    eager_loss, eager_grads = _value_and_grads(step, xs)
    compiled_loss, compiled_grads = _value_and_grads(torch.compile(step, backend="aot_eager", fullgraph=True), xs)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled, eager in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled, eager)


def _value_and_grads(fn, xs):
    xs = [x.detach().requires_grad_() for x in xs]
    loss = fn(*xs)
    return loss, torch.autograd.grad(loss, xs)


def test_reference_passes_gradcheck():
    xs, target_mean, target_var = make_layers(3, [(4, 3, 2), (2, 2, 2)], 2, dtype=torch.float64, device="cpu")
    groups = torch.tensor([1, 0, 1])
    torch.autograd.gradcheck(
        lambda a, b: bn_match.class_bn_loss_reference([a, b], groups, target_mean.double(), target_var.double(),
                                                      [2.0, 1.0], rms=True),
        [x.requires_grad_() for x in xs],
    )


def test_poisoned_allocator_is_active():
    buffer = _dispatch.empty((3,), dtype=torch.float32, device=torch.device("cpu"))
    assert torch.isnan(buffer).all()


@pytest.mark.parametrize(
    "x_shapes, groups_shape, target_width, weights",
    [([(2, 3, 4)], (2,), 3, 1), ([(2, 3, 4, 4)], (3,), 3, 1), ([(2, 3, 4, 4)], (2,), 4, 1),
     ([(2, 3, 4, 4), (3, 2, 2, 2)], (2,), 5, 2), ([(2, 3, 4, 4)], (2,), 3, 2), ([], (2,), 0, 0)],
    ids=["3-d", "groups", "target-width", "batch-mismatch", "weights", "no-layers"],
)
def test_bad_shapes_are_refused(x_shapes, groups_shape, target_width, weights):
    with pytest.raises(ValueError, match="expected"):
        lpld_kernels.class_bn_loss_layers(
            [torch.zeros(shape) for shape in x_shapes], torch.zeros(groups_shape, dtype=torch.int64),
            torch.zeros(1, target_width), torch.zeros(1, target_width), [1.0] * weights,
        )


def test_mixed_dtypes_are_refused():
    with pytest.raises(ValueError, match="one dtype"):
        lpld_kernels.class_bn_loss_layers([torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2, dtype=torch.bfloat16)],
                                          torch.zeros(2, dtype=torch.int64), torch.zeros(1, 6), torch.zeros(1, 6),
                                          [1.0, 1.0])


def test_backend_choice(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what the Triton path on CPU tensors asks for (on a CUDA host too)
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    assert not _dispatch.use_triton(None, cpu)
    assert _dispatch.use_triton("triton", cpu) and not _dispatch.use_triton("torch", cpu)
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert _dispatch.use_triton(None, cpu)
    assert not _dispatch.use_triton("torch", cpu)
    calls = []
    monkeypatch.setattr(bn_match, "_triton_forward", lambda *args: calls.append(1) or bn_match._torch_forward(*args))
    xs, target_mean, target_var = make_layers(2, [(3, 2, 2)], 1, device="cpu")
    lpld_kernels.class_bn_loss(xs[0], torch.zeros(2, dtype=torch.int64), target_mean, target_var)
    assert calls
    with pytest.raises(ValueError, match="unknown kernel backend"):
        _dispatch.use_triton("cuda", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.use_triton("triton", cpu)


def test_an_interpreter_that_cannot_run_says_what_to_install(monkeypatch):
    """Triton 3.6's interpreter calls int() on one-element arrays, which NumPy 2.4 refuses: the CPU
    Triton path names the fix up front (the tests skip with that message instead of failing)."""
    import numpy
    import triton

    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for triton_version, numpy_version, refused in (("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False),
                                                   ("3.7.1", "2.4.1", False), ("3.8.0", "2.0.0", False)):
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(numpy, "__version__", numpy_version)
        if refused:
            with pytest.raises(_dispatch.InterpreterUnavailable, match=r"numpy<2.4 or triton>=3.7"):
                _dispatch.use_triton("triton", cpu)
        else:
            assert _dispatch.use_triton("triton", cpu)
    assert not _dispatch.use_triton("torch", cpu)  # the torch path never needs the interpreter


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet18_layers_on_cuda_match_float64(dtype, channels_last):
    """The 20 BN inputs of ResNet-18 at 32 px, B = 20 in 4 classes, compiled kernels on the GPU."""
    shapes = [(c, side, side) for c, side in RESNET18_BN_INPUTS_32PX]
    xs, target_mean, target_var = make_layers(20, shapes, 10, dtype, channels_last, device="cuda")
    groups, rows = torch.arange(20) // 5, torch.tensor([7, 2, 0, 9])
    assert_matches_float64(xs, groups, target_mean, target_var, [10.0] + [1.0] * 19, rows)


def test_all_bn_layers_of_resnet18_take_at_most_five_launches(monkeypatch):
    """Forward + backward of the loss over 20 BN layers: 4 Triton launches (moments, merge, finish,
    backward) and the backward seed; the committed count (benchmarks/results/launches.json) is the
    current one."""
    from benchmarks.launch_count import RESULTS, count_launches, resnet18_step

    monkeypatch.setattr(_dispatch, "empty", UNPOISONED_EMPTY)  # the NaN fill would count as launches
    counts = count_launches(resnet18_step("all_layers"))
    assert counts["triton"] == 4 and counts["total"] <= 5, counts
    committed = json.loads(RESULTS.read_text())["runs"]
    assert committed["after"]["launches"]["all_layers"]["total"] == counts["total"]
    assert committed["before"]["launches"]["per_layer"]["total"] > 100 * counts["total"]

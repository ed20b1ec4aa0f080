"""Class-wise BatchNorm statistic matching, the LPLD recover loss (SPEC.md section 3).

Each BN layer l's input x_l [B, C_l, H, W] is compared with per-class statistics. A batch may hold
several classes: image b belongs to group ``groups[b]``, and group g is matched against row
``rows[g]`` of the target tables. With mu_l[g] and var_l[g] the mean and biased variance over the
samples of group g and over H, W:

    loss = sum_l w_l * sum over groups g with samples of
           s_l * (||target_mean_l[rows[g]] - mu_l[g]||_2 + ||target_var_l[rows[g]] - var_l[g]||_2)

(plain, unsquared L2 norms over channels; s_l = 1, or 1/sqrt(C_l) with ``rms=True``).

All layers of a step go through four Triton launches, whatever their number (``bn_match_triton``:
moments per tile, merge per group/layer/channel block, one finishing program, the backward), read
where each layer lies through a table of the layers' data pointers. Launch geometry (the tile and
layer tables, block sizes, the aligned variant's choice) is made here, once per shape set.

Both passes accumulate in float32 whatever x's dtype. The op is a ``torch.library`` custom op
(``lpld::class_bn_loss``, with a fake implementation and registered autograd), so a compiled
model calls it without a graph break; its plain PyTorch backend computes the same outputs with
torch ops, and ``class_bn_loss_reference`` (torch autograd through the definition) is the oracle.
"""
import functools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from . import _dispatch
from .bn_match_triton import _backward_kernel, _finish_kernel, _merge_kernel, _moments_kernel

MAX_TILE = 2048  # elements of x one program holds per loop step
MERGE_BLOCK_C = 64  # channels per merge program
FINISH_BLOCK = 1024  # (layer, group) entries the finishing program handles per loop step
GPU_TILE_ELEMENTS = 16384  # elements of x per program on a GPU: ~10^4 programs for ResNet-18 at 224 px
VECTOR_BYTES = 16  # one vector load or store


def tile_elements(device: torch.device) -> int | None:
    """Elements of x per program: enough programs to fill a GPU; on the CPU, where the interpreter
    pays per program, None (one program per sample and channel block)."""
    return GPU_TILE_ELEMENTS if device.type == "cuda" else None


@dataclass(frozen=True)
class Plan:
    """Launch geometry of one set of layer shapes: the tile and layer tables and the block sizes.

    The tile's fast axis follows the memory format (HW for NCHW, C for channels_last) so loads are
    coalesced. Built once per shape set, element size and device, then reused every step.
    """

    tiles: torch.Tensor  # int32 [T, 4]: layer, sample, channel block, HW chunk
    layers: torch.Tensor  # int64 [L, LAYER_FIELDS]
    partial_size: int
    block_c: int
    block_hw: int
    merge_blocks: int  # channel blocks of the widest layer
    channels_last: bool
    vector: int  # elements per vector; a layer whose fast axis is a multiple of it is marked aligned


def block_sizes(shapes: Sequence[tuple[int, int]], channels_last: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for layers of these (C, HW): one choice for the launch."""
    max_c = triton.next_power_of_2(max(c for c, _ in shapes))
    max_hw = triton.next_power_of_2(max(hw for _, hw in shapes))
    if channels_last:
        block_c = min(max_c, 64)
        block_hw = min(max_hw, MAX_TILE // block_c)
    else:
        block_hw = min(max_hw, MAX_TILE // 16)
        block_c = min(max_c, MAX_TILE // block_hw)
    return block_c, block_hw


@functools.lru_cache(maxsize=64)
def make_plan(shapes: tuple[tuple[int, int], ...], batch: int, channels_last: bool, element_size: int,
              device: torch.device) -> Plan:
    """``shapes``: (C, HW) per layer; ``element_size``: bytes per element of the inputs."""
    block_c, block_hw = block_sizes(shapes, channels_last)
    vector = VECTOR_BYTES // element_size
    work = tile_elements(device)
    tiles, layers = [], []
    partial_offset = stat_offset = 0
    for layer, (channels, hw) in enumerate(shapes):
        hw_blocks = triton.cdiv(hw, block_hw)
        blocks_per_chunk = hw_blocks if work is None else max(1, min(hw_blocks, work // (block_c * block_hw)))
        chunk = blocks_per_chunk * block_hw
        chunks = triton.cdiv(hw, chunk)
        aligned = (channels if channels_last else hw) % vector == 0
        layers.append((channels, hw, chunk, chunks, partial_offset, stat_offset, int(aligned)))
        tiles += [(layer, b, c, k) for b in range(batch) for c in range(triton.cdiv(channels, block_c))
                  for k in range(chunks)]
        partial_offset += batch * chunks * channels
        stat_offset += channels
    merge_blocks = triton.cdiv(max(c for c, _ in shapes), MERGE_BLOCK_C)
    return Plan(torch.tensor(tiles, dtype=torch.int32).view(-1, 4).to(device),
                torch.tensor(layers, dtype=torch.int64).to(device), partial_offset, block_c, block_hw,
                merge_blocks, channels_last, vector)


def _plan(xs: Sequence[torch.Tensor]) -> Plan:
    shapes = tuple((x.shape[1], x.shape[2] * x.shape[3]) for x in xs)
    return make_plan(shapes, xs[0].shape[0], _channels_last(xs), xs[0].element_size(), xs[0].device)


def _vector(plan: Plan, tensors: Sequence[torch.Tensor]) -> int:
    """The launch's VEC: the plan's vector when every tensor starts on a vector boundary (a fresh
    allocation does; a view at an odd offset may not), else 1, the variant without alignment hints."""
    return plan.vector if all(t.data_ptr() % VECTOR_BYTES == 0 for t in tensors) else 1


@functools.lru_cache(maxsize=64)
def _device_floats(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).to(device)


def _pointer_table(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Data pointers as an int64 device tensor; copied from pinned memory on CUDA (no host sync)."""
    table = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)
    device = tensors[0].device
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


def _channels_last(xs: Sequence[torch.Tensor]) -> bool:
    """The launch's layout: channels_last when every input is stored that way (a [B, C, 1, 1] input
    is both) and not every one is NCHW."""
    return (all(x.is_contiguous(memory_format=torch.channels_last) for x in xs)
            and not all(x.is_contiguous() for x in xs))


def _triton_forward(xs, groups, target_mean, target_var, rows, weights, rms):
    device, (batch, num_groups) = xs[0].device, (xs[0].shape[0], target_mean.shape[0] if rows is None else rows.shape[0])
    plan = _plan(xs)
    total_channels, layers = sum(x.shape[1] for x in xs), len(xs)
    partial_mean = _dispatch.empty((plan.partial_size,), dtype=torch.float32, device=device)
    partial_m2 = _dispatch.empty((plan.partial_size,), dtype=torch.float32, device=device)
    if plan.tiles.shape[0]:
        _moments_kernel[(plan.tiles.shape[0],)](
            plan.tiles, plan.layers, _pointer_table(xs), partial_mean, partial_m2,
            DTYPE=_TRITON_DTYPES[xs[0].dtype], CHANNELS_LAST=plan.channels_last, BLOCK_C=plan.block_c,
            BLOCK_HW=plan.block_hw, VEC=_vector(plan, xs),
        )
    mean, diff_mean, diff_var = (_dispatch.empty((num_groups, total_channels), dtype=torch.float32, device=device)
                                 for _ in range(3))
    squares = _dispatch.empty((layers, num_groups, plan.merge_blocks, 2), dtype=torch.float32, device=device)
    elements = _dispatch.empty((layers, num_groups), dtype=torch.float32, device=device)
    _merge_kernel[(num_groups, layers, plan.merge_blocks)](
        plan.layers, partial_mean, partial_m2, groups, groups if rows is None else rows, target_mean, target_var,
        mean, diff_mean, diff_var, squares, elements, batch, num_groups, total_channels, target_mean.stride(0),
        HAS_ROWS=rows is not None, BLOCK_C=MERGE_BLOCK_C, BLOCK_B=triton.next_power_of_2(max(batch, 1)),
    )
    norms = _dispatch.empty((layers, num_groups, 2), dtype=torch.float32, device=device)
    loss = _dispatch.empty((), dtype=torch.float32, device=device)
    entries = layers * num_groups
    _finish_kernel[(1,)](
        plan.layers, squares, elements, _device_floats(tuple(weights), device), norms, loss, num_groups, entries,
        RMS=rms, BLOCKS=plan.merge_blocks, MERGE_C=MERGE_BLOCK_C, BLOCK=min(triton.next_power_of_2(entries), FINISH_BLOCK),
    )
    return loss, mean, diff_mean, diff_var, norms, elements


def _triton_backward(grad_loss, xs, groups, mean, diff_mean, diff_var, norms, elements, weights, rms):
    device = xs[0].device
    plan = _plan(xs)
    grads = [_dispatch.empty(x.shape, stride=x.stride(), dtype=x.dtype, device=device) for x in xs]
    pointers = _pointer_table([*xs, *grads])  # one host-to-device copy for both tables
    if plan.tiles.shape[0]:
        _backward_kernel[(plan.tiles.shape[0],)](
            plan.tiles, plan.layers, pointers, pointers[len(xs):], groups, mean, diff_mean, diff_var,
            norms, elements, _device_floats(tuple(weights), device), grad_loss, mean.shape[0], mean.shape[1],
            DTYPE=_TRITON_DTYPES[xs[0].dtype], CHANNELS_LAST=plan.channels_last, RMS=rms,
            BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw, VEC=_vector(plan, [*xs, *grads]),
        )
    return grads


_TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def group_moments_reference(x: torch.Tensor, groups: torch.Tensor, num_groups: int):
    """Per-group channel mean, biased var [G, C] and sample count [G] (two-pass, float32 or float64)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    ones = torch.ones_like(groups)
    count = torch.zeros(num_groups, dtype=groups.dtype, device=groups.device).index_add_(0, groups, ones)
    n = (count * x.shape[2] * x.shape[3]).clamp(min=1).to(x.dtype)[:, None]
    zeros = x.new_zeros(num_groups, x.shape[1])
    mean = zeros.index_add(0, groups, x.sum((2, 3))) / n
    deviation = x - mean[groups][:, :, None, None]
    var = zeros.index_add(0, groups, deviation.square().sum((2, 3))) / n
    return mean, var, count


def _layer_targets(table: torch.Tensor, rows, offset: int, channels: int) -> torch.Tensor:
    table = table[:, offset:offset + channels]
    return table if rows is None else table[rows]


def _torch_forward(xs, groups, target_mean, target_var, rows, weights, rms):
    """The op's outputs computed with torch ops (float32, or float64 for float64 inputs); differentiable,
    which makes it the reference too."""
    num_groups = target_mean.shape[0] if rows is None else rows.shape[0]
    means, diffs_mean, diffs_var, norms, elements, terms = [], [], [], [], [], []
    offset = 0
    for x, weight in zip(xs, weights):
        channels, hw = x.shape[1], x.shape[2] * x.shape[3]
        mean, var, count = group_moments_reference(x, groups, num_groups)
        diff_mean = mean - _layer_targets(target_mean, rows, offset, channels).to(mean.dtype)
        diff_var = var - _layer_targets(target_var, rows, offset, channels).to(mean.dtype)
        norm = torch.stack([torch.linalg.vector_norm(diff_mean, dim=1), torch.linalg.vector_norm(diff_var, dim=1)], 1)
        scale = weight / math.sqrt(channels) if rms else weight
        terms.append(torch.where(count > 0, scale * norm.sum(1), 0.0))
        means.append(mean), diffs_mean.append(diff_mean), diffs_var.append(diff_var), norms.append(norm)
        elements.append((count * hw).to(mean.dtype))
        offset += channels
    return (torch.stack(terms).sum(), torch.cat(means, 1), torch.cat(diffs_mean, 1), torch.cat(diffs_var, 1),
            torch.stack(norms), torch.stack(elements))


def _torch_backward(grad_loss, xs, groups, mean, diff_mean, diff_var, norms, elements, weights, rms):
    """The same closed-form dx as ``_backward_kernel``, with torch ops."""
    grads, offset = [], 0
    for layer, (x, weight) in enumerate(zip(xs, weights)):
        channels = x.shape[1]
        scale = grad_loss * (weight / math.sqrt(channels) if rms else weight) / elements[layer].clamp(min=1)
        inverse = torch.where(norms[layer] > 0, 1 / norms[layer], 0.0)
        columns = slice(offset, offset + channels)
        coef_mean = (diff_mean[:, columns] * (scale * inverse[:, 0])[:, None])[groups]
        coef_var = (diff_var[:, columns] * (2 * scale * inverse[:, 1])[:, None])[groups]
        mu = mean[:, columns][groups]
        dx = coef_mean[:, :, None, None] + coef_var[:, :, None, None] * (x.to(mean.dtype) - mu[:, :, None, None])
        grads.append(torch.empty_like(x).copy_(dx))
        offset += channels
    return grads


@torch.library.custom_op("lpld::class_bn_loss", mutates_args=())
def _class_bn_loss_op(xs: list[torch.Tensor], groups: torch.Tensor, target_mean: torch.Tensor,
                      target_var: torch.Tensor, rows: torch.Tensor | None, weights: list[float], rms: bool,
                      use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    """(loss, mean [G, sum C], mean - target, var - target, norms [L, G, 2], elements [L, G])."""
    if not use_triton:
        return _torch_forward(xs, groups, target_mean, target_var, rows, weights, rms)
    with _dispatch.launching_on(xs[0]):
        return _triton_forward(xs, groups, target_mean, target_var, rows, weights, rms)


@_class_bn_loss_op.register_fake
def _(xs, groups, target_mean, target_var, rows, weights, rms, use_triton):
    dtype = _accumulate_dtype(xs[0].dtype)
    num_groups = target_mean.shape[0] if rows is None else rows.shape[0]
    total_channels = sum(x.shape[1] for x in xs)
    stats = [xs[0].new_empty((num_groups, total_channels), dtype=dtype) for _ in range(3)]
    return (xs[0].new_empty((), dtype=dtype), *stats, xs[0].new_empty((len(xs), num_groups, 2), dtype=dtype),
            xs[0].new_empty((len(xs), num_groups), dtype=dtype))


@torch.library.custom_op("lpld::class_bn_loss_backward", mutates_args=())
def _class_bn_loss_backward_op(grad_loss: torch.Tensor, xs: list[torch.Tensor], groups: torch.Tensor,
                               mean: torch.Tensor, diff_mean: torch.Tensor, diff_var: torch.Tensor,
                               norms: torch.Tensor, elements: torch.Tensor, weights: list[float], rms: bool,
                               use_triton: bool) -> list[torch.Tensor]:
    if not use_triton:
        return _torch_backward(grad_loss, xs, groups, mean, diff_mean, diff_var, norms, elements, weights, rms)
    with _dispatch.launching_on(xs[0]):
        return _triton_backward(grad_loss, xs, groups, mean, diff_mean, diff_var, norms, elements, weights, rms)


@_class_bn_loss_backward_op.register_fake
def _(grad_loss, xs, groups, mean, diff_mean, diff_var, norms, elements, weights, rms, use_triton):
    return [torch.empty_like(x) for x in xs]


def _setup_context(ctx, inputs, output):
    xs, groups, _target_mean, _target_var, _rows, weights, rms, use_triton = inputs
    ctx.save_for_backward(groups, *output[1:], *xs)
    ctx.settings = (weights, rms, use_triton)
    ctx.set_materialize_grads(False)  # the five saved outputs get no gradient: no zero tensors for them


def _backward(ctx, grad_loss, *_unused):
    groups, mean, diff_mean, diff_var, norms, elements, *xs = ctx.saved_tensors
    grads = torch.ops.lpld.class_bn_loss_backward(grad_loss, xs, groups, mean, diff_mean, diff_var, norms,
                                                  elements, *ctx.settings)
    return grads, None, None, None, None, None, None, None


_class_bn_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _one_layout(xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Dense inputs in one memory format (the kernels address x from C and HW alone); copies only
    an input that is not stored that way already."""
    memory_format = torch.channels_last if _channels_last(xs) else torch.contiguous_format
    return [x if x.is_contiguous(memory_format=memory_format) else x.contiguous(memory_format=memory_format)
            for x in xs]


def class_bn_loss_layers(xs: Sequence[torch.Tensor], groups: torch.Tensor, target_mean: torch.Tensor,
                         target_var: torch.Tensor, weights: Sequence[float], rows: torch.Tensor | None = None, *,
                         rms: bool = False, backend: str | None = None) -> torch.Tensor:
    """sum_l w_l * (class BN matching loss of layer l): every BN layer of a step in four launches.

    xs: the BN inputs [B, C_l, H_l, W_l], one dtype (float32/bfloat16/float16; float64 on the torch
    backend), NCHW or channels_last; groups: int [B] in [0, G); target_mean / target_var: one table
    [R, sum_l C_l] holding every layer's columns side by side (``models.bn_layers`` order); rows:
    int [G], the table row of each group (None: row g for group g, R = G). The gradient flows to
    xs only. Returns a float32 (or float64) scalar.
    """
    xs = list(xs)
    if not xs or any(x.dim() != 4 or x.shape[0] != xs[0].shape[0] for x in xs) or groups.shape != xs[0].shape[:1]:
        raise ValueError(f"expected xs [B, C, H, W] with one B and groups [B], got "
                         f"{[tuple(x.shape) for x in xs]} and {tuple(groups.shape)}")
    if any(x.dtype != xs[0].dtype for x in xs):
        raise ValueError(f"expected one dtype for all layers, got {sorted({str(x.dtype) for x in xs})}")
    total_channels = sum(x.shape[1] for x in xs)
    if target_mean.dim() != 2 or target_mean.shape[1] != total_channels or target_var.shape != target_mean.shape:
        raise ValueError(f"expected target_mean and target_var [R, {total_channels}] (the layers' channels side by "
                         f"side), got {tuple(target_mean.shape)} and {tuple(target_var.shape)}")
    if len(weights) != len(xs):
        raise ValueError(f"expected one weight per layer ({len(xs)}), got {len(weights)}")
    xs = _one_layout(xs)
    use_triton = _dispatch.use_triton(backend, xs[0])
    if use_triton and xs[0].dtype not in _TRITON_DTYPES:
        raise ValueError(f"the Triton kernels read {list(_TRITON_DTYPES)}, got {xs[0].dtype}: use backend='torch'")
    if rows is not None and rows.dim() != 1:
        raise ValueError(f"expected rows [G], got {tuple(rows.shape)}")
    rows = None if rows is None else rows.to(torch.int64)
    return torch.ops.lpld.class_bn_loss(xs, groups.to(torch.int64), target_mean.contiguous(), target_var.contiguous(),
                                        rows, [float(w) for w in weights], rms, use_triton)[0]


def class_bn_loss(x, groups, target_mean, target_var, *, rms=False, backend=None) -> torch.Tensor:
    """Sum over groups of ||mu_t[g] - mu_g(x)||_2 + ||var_t[g] - var_g(x)||_2 for one BN layer.

    x: [B, C, H, W] (NCHW or channels_last; float32/bfloat16/float16), groups: int [B] with values
    in [0, G), target_mean / target_var: [G, C]. Returns a float32 (or float64) scalar.
    """
    return class_bn_loss_layers([x], groups, target_mean, target_var, [1.0], rms=rms, backend=backend)


def class_bn_loss_reference(xs, groups, target_mean, target_var, weights, rows=None, *, rms=False) -> torch.Tensor:
    """The definition in plain torch ops, differentiated by autograd: the op's torch forward run outside
    the op (the tests' oracle for the Triton kernels and for both closed-form backward passes)."""
    return _torch_forward(xs, groups, target_mean, target_var, rows, weights, rms)[0]

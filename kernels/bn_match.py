"""Class-wise BatchNorm statistic matching, the LPLD recover loss (SPEC.md section 3).

Each BN layer's input x [B, C, H, W] is compared with per-class running statistics. A batch may
hold several classes: image b is matched against group ``groups[b]``. With mu[g] and var[g] the
mean and biased variance over the samples of group g and over H, W:

    loss = sum over groups g with samples of  ||target_mean[g] - mu[g]||_2 + ||target_var[g] - var[g]||_2

(plain, unsquared L2 norms over channels; ``rms=True`` divides each norm by sqrt(C)).

The fused path reads x once forward (per-channel moments of every (sample, HW chunk) tile, merged
with Chan's formula, so a large common offset such as 1000 + noise loses no precision) and once
backward (dx = dmu/n + dvar * 2 (x - mu) / n from the saved group means). Both passes accumulate in
float32 whatever x's dtype. The norm math on the tiny [G, C] moments is ordinary torch autograd,
shared by the fused and the reference path.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from . import _dispatch

MAX_TILE = 2048  # elements of x one program holds per loop step


@triton.jit
def _partial_moments_kernel(
    x_ptr, mean_ptr, m2_ptr,
    C, HW, chunk, stride_b, stride_c, stride_hw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """Mean and sum of squared deviations per channel of one (sample, channel block, HW chunk)."""
    b = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk_id = tl.program_id(2)
    channel_mask = channels < C
    base = x_ptr + b.to(tl.int64) * stride_b + channels[:, None].to(tl.int64) * stride_c
    hw_begin = chunk_id * chunk
    hw_end = tl.minimum(hw_begin + chunk, HW)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = channel_mask[:, None] & (hw < hw_end)[None, :]
        tile = tl.load(base + hw[None, :] * stride_hw, mask=mask, other=0.0).to(tl.float32)
        count = (start - hw_begin).to(tl.float32)  # positions merged so far
        tile_count = tl.minimum(hw_end - start, BLOCK_HW).to(tl.float32)
        tile_mean = tl.sum(tile, axis=1) / tile_count
        deviation = tl.where(mask, tile - tile_mean[:, None], 0.0)
        total = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / total)
        m2 += tl.sum(deviation * deviation, axis=1) + delta * delta * (count * tile_count / total)
    out = (b * tl.num_programs(2) + chunk_id) * C + channels
    tl.store(mean_ptr + out, mean, mask=channel_mask)
    tl.store(m2_ptr + out, m2, mask=channel_mask)


@triton.jit
def _moments_backward_kernel(
    x_ptr, dx_ptr, groups_ptr, mean_ptr, coef_mean_ptr, coef_var_ptr,
    C, HW, chunk, stride_b, stride_c, stride_hw,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """dx = coef_mean[g, c] + coef_var[g, c] * (x - mu[g, c]) for the tile's sample b in group g."""
    b = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    stats = tl.load(groups_ptr + b) * C + channels
    mu = tl.load(mean_ptr + stats, mask=channel_mask, other=0.0)[:, None]
    coef_mean = tl.load(coef_mean_ptr + stats, mask=channel_mask, other=0.0)[:, None]
    coef_var = tl.load(coef_var_ptr + stats, mask=channel_mask, other=0.0)[:, None]
    offset = b.to(tl.int64) * stride_b + channels[:, None].to(tl.int64) * stride_c
    hw_begin = tl.program_id(2) * chunk
    hw_end = tl.minimum(hw_begin + chunk, HW)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        mask = channel_mask[:, None] & (hw < hw_end)[None, :]
        at = offset + hw[None, :] * stride_hw
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        dx = coef_mean + coef_var * (x - mu)
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache
def wanted_programs(device: torch.device) -> int:
    """Enough programs to fill a GPU; one on the CPU, where the interpreter pays per program."""
    if device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


class _Tiling:
    """Launch geometry shared by the forward and backward kernels.

    The tile's fast axis follows the memory format (HW for NCHW, C for channels_last) so loads
    are coalesced; HW is cut into chunks only when (sample, channel block) programs alone would
    leave a GPU idle (the interpreter on CPU gets as few programs as possible).
    """

    def __init__(self, x: torch.Tensor):
        batch, channels, height, width = x.shape
        self.hw = height * width
        self.stride_hw = x.stride(3) if width > 1 else x.stride(2)
        if x.stride(1) == 1 and channels > 1:
            self.block_c = min(triton.next_power_of_2(channels), 64)
            self.block_hw = min(triton.next_power_of_2(self.hw), MAX_TILE // self.block_c)
        else:
            self.block_hw = min(triton.next_power_of_2(self.hw), MAX_TILE)
            self.block_c = min(triton.next_power_of_2(channels), MAX_TILE // self.block_hw)
        programs = batch * triton.cdiv(channels, self.block_c)
        hw_blocks = triton.cdiv(self.hw, self.block_hw)
        splits = min(hw_blocks, max(1, triton.cdiv(wanted_programs(x.device), max(programs, 1))))
        self.chunk = triton.cdiv(hw_blocks, splits) * self.block_hw
        self.chunks = triton.cdiv(self.hw, self.chunk)
        self.grid = (batch, triton.cdiv(channels, self.block_c), self.chunks)

    def launch_args(self, x: torch.Tensor) -> tuple:
        return (x.shape[1], self.hw, self.chunk, x.stride(0), x.stride(1), self.stride_hw)

    def chunk_sizes(self, device: torch.device) -> torch.Tensor:
        starts = torch.arange(self.chunks, device=device) * self.chunk
        return (self.hw - starts).clamp(max=self.chunk).to(torch.float32)


def _is_dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _group_count(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Samples per group, without the host sync that torch.bincount needs on CUDA."""
    ones = torch.ones_like(groups)
    return torch.zeros(num_groups, dtype=groups.dtype, device=groups.device).index_add_(0, groups, ones)


class GroupMoments(torch.autograd.Function):
    """(x, groups, G) -> per-group channel mean, biased var [G, C] (float32) and sample count [G]."""

    @staticmethod
    def forward(ctx, x, groups, num_groups):
        if not _is_dense(x):
            x = x.contiguous()
        tiling = _Tiling(x)
        batch, channels = x.shape[:2]
        partial_mean = _dispatch.empty((batch, tiling.chunks, channels), dtype=torch.float32, device=x.device)
        partial_m2 = _dispatch.empty((batch, tiling.chunks, channels), dtype=torch.float32, device=x.device)
        _partial_moments_kernel[tiling.grid](
            x, partial_mean, partial_m2, *tiling.launch_args(x),
            BLOCK_C=tiling.block_c, BLOCK_HW=tiling.block_hw,
        )
        # Chan's merge of the chunk moments into group moments: sizes are [B, chunks, C], tiny.
        weights = tiling.chunk_sizes(x.device)[:, None]
        count = _group_count(groups, num_groups)
        n = (count * tiling.hw).clamp(min=1).to(torch.float32)[:, None]
        zeros = partial_mean.new_zeros(num_groups, channels)
        mean = zeros.index_add(0, groups, (partial_mean * weights).sum(1)) / n
        spread = weights * (partial_mean - mean[groups][:, None, :]).square()
        var = zeros.index_add(0, groups, (partial_m2 + spread).sum(1)) / n
        ctx.tiling = tiling
        ctx.save_for_backward(x, groups, mean, n)
        ctx.mark_non_differentiable(count)
        return mean, var, count

    @staticmethod
    def backward(ctx, grad_mean, grad_var, _grad_count):
        x, groups, mean, n = ctx.saved_tensors
        tiling = ctx.tiling
        dx = _dispatch.empty(x.shape, stride=x.stride(), dtype=x.dtype, device=x.device)
        _moments_backward_kernel[tiling.grid](
            x, dx, groups, mean, (grad_mean / n).contiguous(), (2 * grad_var / n).contiguous(),
            *tiling.launch_args(x), BLOCK_C=tiling.block_c, BLOCK_HW=tiling.block_hw,
        )
        return dx, None, None


def group_moments_reference(x: torch.Tensor, groups: torch.Tensor, num_groups: int):
    """Plain PyTorch twin of ``GroupMoments`` (two-pass, in float32 or the wider input dtype)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    count = _group_count(groups, num_groups)
    n = (count * x.shape[2] * x.shape[3]).clamp(min=1).to(x.dtype)[:, None]
    zeros = x.new_zeros(num_groups, x.shape[1])
    mean = zeros.index_add(0, groups, x.sum((2, 3))) / n
    deviation = x - mean[groups][:, :, None, None]
    var = zeros.index_add(0, groups, deviation.square().sum((2, 3))) / n
    return mean, var, count


def _matching_loss(mean, var, count, target_mean, target_var, rms: bool) -> torch.Tensor:
    """Masked by ``count > 0`` rather than indexed, so no host sync happens on CUDA."""
    distance = (
        torch.linalg.vector_norm(target_mean.to(mean.dtype) - mean, dim=1)
        + torch.linalg.vector_norm(target_var.to(var.dtype) - var, dim=1)
    )
    if rms:
        distance = distance / math.sqrt(mean.shape[1])
    return torch.where(count > 0, distance, 0.0).sum()


def class_bn_loss(x, groups, target_mean, target_var, *, rms=False, backend=None) -> torch.Tensor:
    """Sum over groups of ||mu_t[g] - mu_g(x)||_2 + ||var_t[g] - var_g(x)||_2, differentiable in x.

    x: [B, C, H, W] (NCHW or channels_last; float32/bfloat16/float16), groups: int64 [B] with
    values in [0, G), target_mean / target_var: [G, C]. Returns a float32 (or float64) scalar.
    """
    if x.dim() != 4 or groups.shape != x.shape[:1]:
        raise ValueError(f"expected x [B, C, H, W] and groups [B], got {tuple(x.shape)} and {tuple(groups.shape)}")
    if target_mean.dim() != 2 or target_mean.shape[1] != x.shape[1] or target_var.shape != target_mean.shape:
        raise ValueError(
            f"expected target_mean and target_var [G, {x.shape[1]}], "
            f"got {tuple(target_mean.shape)} and {tuple(target_var.shape)}"
        )
    groups = groups.to(torch.int64)
    num_groups = target_mean.shape[0]
    if _dispatch.use_triton(backend, x):
        moments = GroupMoments.apply(x, groups, num_groups)
    else:
        moments = group_moments_reference(x, groups, num_groups)
    return _matching_loss(*moments, target_mean, target_var, rms)

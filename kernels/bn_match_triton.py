"""The Triton kernels of the class-wise BN-matching loss (``bn_match.py`` launches them).

All layers of a step go through four Triton launches, whatever their number (an offset table
over layers, a tile table over (layer, sample, channel block, HW chunk), and a table of the
layers' data pointers; each layer is read where it lies):

1. ``_moments_kernel``: per tile, the channel means and sums of squared deviations of one
   (sample, HW chunk); x is read once.
2. ``_merge_kernel``: per (group, layer, block of channels), Chan's merge of the group's samples'
   tiles into group moments (with a large common offset such as 1000 + noise the variance keeps
   float32's precision of the mean, where sums of squares would lose it entirely), the differences
   to the targets and their squares summed over the block. A group whose samples are contiguous
   (recover's layout) reads only those; any other layout is scanned sample by sample.
3. ``_finish_kernel``: one program turns the blocks' sums (in block order: deterministic) into the
   norms and the weighted loss.
4. ``_backward_kernel``: every layer's dx = a[g, c] + b[g, c] * (x - mu[g, c]), with
   a = w s (mu - t_mu) / (n ||.||) and b = 2 w s (var - t_var) / (n ||.||); x is read once more.

The pointers come from a table, so the compiler cannot see their alignment: when every pointer
starts on a 16-byte boundary (checked on the host) the aligned variant (``VEC`` > 1) declares it,
and a layer whose fast axis (HW in NCHW, C in channels_last) is a multiple of a vector takes a
path the compiler reads and writes in 16-byte vectors; the other layers take the plain path.
"""
import triton
import triton.language as tl

# per layer: C, HW, chunk, chunks, partial offset, statistics offset, and whether its fast axis (HW in
# NCHW, C in channels_last) is a multiple of a vector, so the aligned variant may read it in vectors
LAYER_FIELDS = tl.constexpr(7)


@triton.jit
def _layer_row(layers_ptr, layer):
    row = layers_ptr + layer * LAYER_FIELDS
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4),
            tl.load(row + 5), tl.load(row + 6))


@triton.jit
def _tile(tiles_ptr, layers_ptr, BLOCK_C: tl.constexpr):
    """This program's tile: layer fields, sample, channels and HW range."""
    tile = tiles_ptr + tl.program_id(0) * 4
    layer = tl.load(tile)
    b = tl.load(tile + 1).to(tl.int64)
    channels = tl.load(tile + 2) * BLOCK_C + tl.arange(0, BLOCK_C)
    chunk_id = tl.load(tile + 3)
    C, HW, chunk, chunks, partial_offset, stat_offset, aligned = _layer_row(layers_ptr, layer)
    hw_begin = chunk_id * chunk
    return layer, b, channels, chunk_id, C, HW, chunk, chunks, partial_offset, stat_offset, aligned, hw_begin


@triton.jit
def _sample(table_ptr, layer, b, C, HW, DTYPE: tl.constexpr, VEC: tl.constexpr):
    """Sample b of the layer's tensor whose data pointer is ``table_ptr[layer]``."""
    x = tl.load(table_ptr + layer).to(tl.pointer_type(DTYPE)) + b * C * HW
    if VEC > 1:
        x = tl.multiple_of(x, 16)  # the host checked every pointer; C * HW is a multiple of VEC
    return x


@triton.jit
def _tile_step(channels, start, C, HW, hw_end, CHANNELS_LAST: tl.constexpr, BLOCK_HW: tl.constexpr,
               VEC: tl.constexpr):
    """Offsets into a sample and the mask of one [BLOCK_C, BLOCK_HW] step at HW position ``start``.

    With VEC > 1 (an aligned layer: its fast axis and HW range are multiples of VEC) the offsets are
    declared to run in aligned groups of VEC along the fast axis, and the mask constant over them,
    which lets the compiler read and write 16-byte vectors. The hints sit on values made here: a
    hint on a function argument is lost."""
    hw = start + tl.arange(0, BLOCK_HW)
    mask = (channels < C)[:, None] & (hw < hw_end)[None, :]
    if CHANNELS_LAST:
        offsets = channels[:, None] + hw[None, :] * C
        if VEC > 1:
            offsets = tl.max_contiguous(tl.multiple_of(offsets, [VEC, 1]), [VEC, 1])
            mask = tl.max_constancy(mask, [VEC, 1])
    else:
        offsets = channels[:, None] * HW + hw[None, :]
        if VEC > 1:
            offsets = tl.max_contiguous(tl.multiple_of(offsets, [1, VEC]), [1, VEC])
            mask = tl.max_constancy(mask, [1, VEC])
    return offsets, mask


@triton.jit
def _sample_moments(inputs_ptr, layer, b, channels, C, HW, hw_begin, hw_end, DTYPE: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, VEC: tl.constexpr):
    """Channel means and sums of squared deviations of sample b over HW in [hw_begin, hw_end), merged
    step by step."""
    x = _sample(inputs_ptr, layer, b, C, HW, DTYPE, VEC)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        offsets, mask = _tile_step(channels, start, C, HW, hw_end, CHANNELS_LAST, BLOCK_HW, VEC)
        values = tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32)
        count = (start - hw_begin).to(tl.float32)  # positions merged so far
        tile_count = tl.minimum(hw_end - start, BLOCK_HW).to(tl.float32)
        tile_mean = tl.sum(values, axis=1) / tile_count
        deviation = tl.where(mask, values - tile_mean[:, None], 0.0)
        total = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / total)
        m2 += tl.sum(deviation * deviation, axis=1) + delta * delta * (count * tile_count / total)
    return mean, m2


@triton.jit
def _moments_kernel(
    tiles_ptr, layers_ptr, inputs_ptr, mean_ptr, m2_ptr,
    DTYPE: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    VEC: tl.constexpr,
):
    """Mean and sum of squared deviations per channel of one tile (sample, channel block, HW chunk).

    VEC > 1 is the aligned variant (every pointer 16-byte aligned): a layer whose fast axis is a
    multiple of VEC takes the path the compiler may read in vectors, the others the plain one."""
    (layer, b, channels, chunk_id, C, HW, chunk, chunks, partial_offset, stat_offset, aligned,
     hw_begin) = _tile(tiles_ptr, layers_ptr, BLOCK_C)
    hw_end = tl.minimum(hw_begin + chunk, HW)
    if VEC > 1:
        if aligned != 0:
            mean, m2 = _sample_moments(inputs_ptr, layer, b, channels, C, HW, hw_begin, hw_end, DTYPE, CHANNELS_LAST,
                                       BLOCK_C, BLOCK_HW, VEC)
        else:
            mean, m2 = _sample_moments(inputs_ptr, layer, b, channels, C, HW, hw_begin, hw_end, DTYPE, CHANNELS_LAST,
                                       BLOCK_C, BLOCK_HW, 1)
    else:
        mean, m2 = _sample_moments(inputs_ptr, layer, b, channels, C, HW, hw_begin, hw_end, DTYPE, CHANNELS_LAST,
                                   BLOCK_C, BLOCK_HW, 1)
    out = partial_offset + (b * chunks + chunk_id) * C + channels
    tl.store(mean_ptr + out, mean, mask=channels < C)
    tl.store(m2_ptr + out, m2, mask=channels < C)


@triton.jit
def _members(groups_ptr, g, B, BLOCK_B: tl.constexpr):
    """The sample range [first, end) to scan for group g: its own samples when they are contiguous (as
    recover lays them out), else the whole batch (the caller still checks each sample's group)."""
    samples = tl.arange(0, BLOCK_B)
    member = (tl.load(groups_ptr + samples, mask=samples < B, other=-1) == g) & (samples < B)
    count = tl.sum(member.to(tl.int32), axis=0)
    first = tl.min(tl.where(member, samples, BLOCK_B), axis=0)
    last = tl.max(tl.where(member, samples, -1), axis=0)
    contiguous = (last - first + 1 == count) | (count == 0)  # no member: first > last, an empty range
    return tl.where(contiguous, first, 0), tl.where(contiguous, last + 1, B)


@triton.jit
def _merge_kernel(
    layers_ptr, partial_mean_ptr, partial_m2_ptr, groups_ptr, rows_ptr, target_mean_ptr, target_var_ptr,
    mean_ptr, diff_mean_ptr, diff_var_ptr, squares_ptr, elements_ptr,
    B, num_groups, total_channels, target_stride,
    HAS_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Group moments of one (group, layer, channel block) by Chan's merge of its samples' tiles, the
    differences to the targets, and the block's sums of squared differences."""
    g = tl.program_id(0)
    layer = tl.program_id(1)
    block = tl.program_id(2)
    C, HW, chunk, chunks, partial_offset, stat_offset, aligned = _layer_row(layers_ptr, layer)
    if block * BLOCK_C < C:
        channels = block * BLOCK_C + tl.arange(0, BLOCK_C)
        channel_mask = channels < C
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        first, end = _members(groups_ptr, g, B, BLOCK_B)
        for b in range(first, end):
            if tl.load(groups_ptr + b) == g:
                for chunk_id in range(0, chunks):
                    at = partial_offset + (b * chunks + chunk_id) * C + channels
                    part_mean = tl.load(partial_mean_ptr + at, mask=channel_mask, other=0.0)
                    part_m2 = tl.load(partial_m2_ptr + at, mask=channel_mask, other=0.0)
                    part_count = tl.minimum(chunk, HW - chunk_id * chunk).to(tl.float32)
                    total = count + part_count
                    delta = part_mean - mean
                    mean += delta * (part_count / total)
                    m2 += part_m2 + delta * delta * (count * part_count / total)
                    count = total
        var = m2 / tl.maximum(count, 1.0)
        if HAS_ROWS:
            target_base = tl.load(rows_ptr + g).to(tl.int64) * target_stride + stat_offset
        else:
            target_base = g.to(tl.int64) * target_stride + stat_offset
        target_mean = tl.load(target_mean_ptr + target_base + channels, mask=channel_mask, other=0.0).to(tl.float32)
        target_var = tl.load(target_var_ptr + target_base + channels, mask=channel_mask, other=0.0).to(tl.float32)
        diff_mean = tl.where(channel_mask, mean - target_mean, 0.0)
        diff_var = tl.where(channel_mask, var - target_var, 0.0)
        out = g.to(tl.int64) * total_channels + stat_offset + channels
        tl.store(mean_ptr + out, mean, mask=channel_mask)
        tl.store(diff_mean_ptr + out, diff_mean, mask=channel_mask)
        tl.store(diff_var_ptr + out, diff_var, mask=channel_mask)
        at = (layer * num_groups + g) * tl.num_programs(2) + block
        tl.store(squares_ptr + 2 * at, tl.sum(diff_mean * diff_mean, axis=0))
        tl.store(squares_ptr + 2 * at + 1, tl.sum(diff_var * diff_var, axis=0))
        if block == 0:
            tl.store(elements_ptr + layer * num_groups + g, tl.max(count, axis=0))


@triton.jit
def _finish_kernel(
    layers_ptr, squares_ptr, elements_ptr, weights_ptr, norms_ptr, loss_ptr, num_groups, entries,
    RMS: tl.constexpr, BLOCKS: tl.constexpr, MERGE_C: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: per (layer, group) the two norms from the blocks' sums of squares (in block order,
    so the loss is deterministic), and the loss sum_l w_l s_l sum_g (norms) over groups with samples."""
    loss = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, entries, BLOCK):
        entry = start + tl.arange(0, BLOCK)
        valid = entry < entries
        layer = entry // num_groups
        C = tl.load(layers_ptr + layer * LAYER_FIELDS, mask=valid, other=1)
        square_mean = tl.zeros([BLOCK], dtype=tl.float32)
        square_var = tl.zeros([BLOCK], dtype=tl.float32)
        for block in range(0, BLOCKS):
            at = entry * BLOCKS + block
            present = valid & (block * MERGE_C < C)
            square_mean += tl.load(squares_ptr + 2 * at, mask=present, other=0.0)
            square_var += tl.load(squares_ptr + 2 * at + 1, mask=present, other=0.0)
        norm_mean = tl.sqrt(square_mean)
        norm_var = tl.sqrt(square_var)
        tl.store(norms_ptr + 2 * entry, norm_mean, mask=valid)
        tl.store(norms_ptr + 2 * entry + 1, norm_var, mask=valid)
        scale = tl.load(weights_ptr + layer, mask=valid, other=0.0)
        if RMS:
            scale = scale / tl.sqrt(C.to(tl.float32))
        elements = tl.load(elements_ptr + entry, mask=valid, other=0.0)
        loss += tl.where(valid & (elements > 0), scale * (norm_mean + norm_var), 0.0)
    tl.store(loss_ptr, tl.sum(loss, axis=0))


@triton.jit
def _sample_gradient(inputs_ptr, grads_ptr, layer, b, channels, C, HW, hw_begin, hw_end, mu, coef_mean, coef_var,
                     DTYPE: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_HW: tl.constexpr, VEC: tl.constexpr):
    """dx of sample b over HW in [hw_begin, hw_end)."""
    x = _sample(inputs_ptr, layer, b, C, HW, DTYPE, VEC)
    dx = _sample(grads_ptr, layer, b, C, HW, DTYPE, VEC)
    for start in range(hw_begin, hw_end, BLOCK_HW):
        offsets, mask = _tile_step(channels, start, C, HW, hw_end, CHANNELS_LAST, BLOCK_HW, VEC)
        values = tl.load(x + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx + offsets, (coef_mean + coef_var * (values - mu)).to(DTYPE), mask=mask)


@triton.jit
def _backward_kernel(
    tiles_ptr, layers_ptr, inputs_ptr, grads_ptr, groups_ptr, mean_ptr, diff_mean_ptr, diff_var_ptr,
    norms_ptr, elements_ptr, weights_ptr, grad_loss_ptr, num_groups, total_channels,
    DTYPE: tl.constexpr, CHANNELS_LAST: tl.constexpr, RMS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, VEC: tl.constexpr,
):
    """dx = a[g, c] + b[g, c] * (x - mu[g, c]) for one tile; the tile's sample b is in group g."""
    (layer, b, channels, chunk_id, C, HW, chunk, chunks, partial_offset, stat_offset, aligned,
     hw_begin) = _tile(tiles_ptr, layers_ptr, BLOCK_C)
    hw_end = tl.minimum(hw_begin + chunk, HW)
    channel_mask = channels < C
    g = tl.load(groups_ptr + b)
    at = layer * num_groups + g
    scale = tl.load(weights_ptr + layer) * tl.load(grad_loss_ptr).to(tl.float32) / tl.load(elements_ptr + at)
    if RMS:
        scale = scale / tl.sqrt(C.to(tl.float32))
    norm_mean = tl.load(norms_ptr + 2 * at)
    norm_var = tl.load(norms_ptr + 2 * at + 1)
    stats = g * total_channels + stat_offset + channels
    mu = tl.load(mean_ptr + stats, mask=channel_mask, other=0.0)[:, None]
    coef_mean = tl.load(diff_mean_ptr + stats, mask=channel_mask, other=0.0)[:, None] * tl.where(
        norm_mean > 0, scale / norm_mean, 0.0)
    coef_var = tl.load(diff_var_ptr + stats, mask=channel_mask, other=0.0)[:, None] * tl.where(
        norm_var > 0, 2 * scale / norm_var, 0.0)
    if VEC > 1:
        if aligned != 0:
            _sample_gradient(inputs_ptr, grads_ptr, layer, b, channels, C, HW, hw_begin, hw_end, mu, coef_mean,
                             coef_var, DTYPE, CHANNELS_LAST, BLOCK_HW, VEC)
        else:
            _sample_gradient(inputs_ptr, grads_ptr, layer, b, channels, C, HW, hw_begin, hw_end, mu, coef_mean,
                             coef_var, DTYPE, CHANNELS_LAST, BLOCK_HW, 1)
    else:
        _sample_gradient(inputs_ptr, grads_ptr, layer, b, channels, C, HW, hw_begin, hw_end, mu, coef_mean,
                         coef_var, DTYPE, CHANNELS_LAST, BLOCK_HW, 1)

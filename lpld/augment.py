"""The one random crop / flip / cutout / CutMix implementation (SPEC.md sections 4, 8 and 10.7).

Recover samples crop boxes here; relabel samples a whole record here and runs the teacher on
``replay(record)``; training replays the stored record with the same ``replay``. Because relabel
and training call the same function on the same stored integers, the student sees exactly the
pixels the teacher labelled (SPEC.md section 8, "the same crop function with the same stored
parameters").

Every sampler takes an explicit ``torch.Generator`` so that a run can be regenerated from its
seeds (SPEC.md section 11.11). Boxes are integer pixels: they store exactly and replay exactly.
The resize is bilinear with ``antialias=False`` on float input, which is what
``torchvision.transforms.v2.functional.resized_crop`` does on float tensors and what DALI's
``fn.resize(INTERP_LINEAR, antialias=False, dtype=FLOAT)`` reproduces (shared/ENV.md).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Cutout:
    """IN-21K's Cutout record: per sample a clipped box (y1, y2, x1, x2) and an 8-bit fill per channel."""

    box: np.ndarray  # int32 [n, 4]
    fill: np.ndarray  # uint8 [n, C]


@dataclass
class CutMix:
    """One whole-batch CutMix: source permutation, the sampled lambda and the box (y1, y2, x1, x2)."""

    perm: np.ndarray  # int64 [n]
    lam: float
    box: np.ndarray  # int32 [4]


@dataclass
class Record:
    """One stored batch (SPEC.md section 8): what to replay, and the teacher's logits on it.

    ``logits`` is None for a freshly sampled record the teacher has not seen yet; ``cutout`` and
    the ``mix_*`` fields are None when the recipe has no cutout (flip="flip") or no mix.
    """

    img_idx: np.ndarray  # int [B], indices into the distilled image listing
    crop: np.ndarray  # int32 [B, 4] (top, left, h, w) in distilled-image pixels
    flip: np.ndarray  # bool [B]
    cutout: Cutout | None = None
    mix_perm: np.ndarray | None = None  # int [B]
    mix_lam: float | None = None
    mix_box: np.ndarray | None = None  # int32 [4] (y1, y2, x1, x2)
    logits: np.ndarray | None = None  # float16 [B, K]


def _uniform(generator: torch.Generator, shape, low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low


def _randint_below(generator: torch.Generator, bounds: torch.Tensor) -> torch.Tensor:
    """One integer in [0, bound) per entry of ``bounds`` (int64, all >= 1)."""
    return (torch.rand(bounds.shape, generator=generator, dtype=torch.float64) * bounds).long().clamp_max(bounds - 1)


def sample_crop_boxes(
    generator: torch.Generator,
    n: int,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """RandomResizedCrop boxes (top, left, h, w) as int32 [n, 4].

    Same rule as torchvision's ``RandomResizedCrop.get_params``: up to 10 tries of an area
    fraction uniform in ``scale`` and a log-uniform aspect ratio, keep the first box that fits,
    else a centered box with the aspect ratio clamped to ``ratio``. The tries are drawn for all
    samples at once (the distribution is torchvision's; the random stream is ours).
    """
    tries = 10
    area = height * width
    target = area * _uniform(generator, (n, tries), scale[0], scale[1])
    aspect = torch.exp(_uniform(generator, (n, tries), math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(fits.int(), dim=1)
    rows = torch.arange(n)
    h, w, found = h[rows, first], w[rows, first], fits[rows, first]

    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    h = torch.where(found, h, torch.full_like(h, fh))
    w = torch.where(found, w, torch.full_like(w, fw))
    top = torch.where(found, _randint_below(generator, height - h + 1), (height - h) // 2)
    left = torch.where(found, _randint_below(generator, width - w + 1), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1).to(torch.int32).numpy()


def sample_flips(generator: torch.Generator, n: int) -> np.ndarray:
    """Horizontal flip with probability 0.5 per sample, bool [n]."""
    return (torch.rand(n, generator=generator) < 0.5).numpy()


def _centered_boxes(generator: torch.Generator, n: int, height: int, width: int, cut_h: int, cut_w: int) -> np.ndarray:
    """Boxes (y1, y2, x1, x2) of half-size cut_h//2, cut_w//2 around a uniform integer center, clipped."""
    cy = _randint_below(generator, torch.full((n,), height))
    cx = _randint_below(generator, torch.full((n,), width))
    y1, y2 = (cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height)
    x1, x2 = (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)
    return torch.stack([y1, y2, x1, x2], dim=1).to(torch.int32).numpy()


def sample_cutmix(generator: torch.Generator, n: int, height: int, width: int) -> CutMix:
    """Whole-batch CutMix (SPEC.md section 4): perm, lambda ~ Beta(1, 1) and the pasted box.

    Beta(1, 1) is the uniform distribution on [0, 1], so lambda is drawn as one uniform number.
    The box side is int(side * sqrt(1 - lambda)); the sampled lambda is stored, not the
    area-corrected one, because the teacher's logits already describe the mixed image.
    """
    perm = torch.randperm(n, generator=generator).numpy()
    lam = float(torch.rand((), generator=generator, dtype=torch.float64))
    cut = math.sqrt(1.0 - lam)
    box = _centered_boxes(generator, 1, height, width, int(height * cut), int(width * cut))[0]
    return CutMix(perm=perm, lam=lam, box=box)


def sample_cutout(generator: torch.Generator, n: int, height: int, width: int, channels: int) -> Cutout:
    """IN-21K Cutout (SPEC.md section 4): a 0.5 H x 0.5 W box around a uniform center, uniform 8-bit fill."""
    box = _centered_boxes(generator, n, height, width, height // 2, width // 2)
    fill = torch.randint(0, 256, (n, channels), generator=generator, dtype=torch.int64).to(torch.uint8).numpy()
    return Cutout(box=box, fill=fill)


def crop_resize_flip(images: torch.Tensor, boxes, flips, size: int) -> torch.Tensor:
    """Crop each float image to its box, resize to size x size (bilinear, no antialias), flip.

    Equal to torchvision ``resized_crop(img, top, left, h, w, [size, size], BILINEAR,
    antialias=False)`` followed by ``hflip`` where ``flips`` is set (tests/test_augment.py).
    """
    out = images.new_empty((images.shape[0], images.shape[1], size, size))
    # boxes and flips are host values (stored records, recover's draws): deciding each flip on the
    # host sends nothing to a GPU, so a step never waits on a host-to-device copy
    for i, ((top, left, h, w), flip) in enumerate(zip(np.asarray(boxes).tolist(), np.asarray(flips).tolist())):
        patch = images[i : i + 1, :, top : top + h, left : left + w]
        resized = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        out[i : i + 1] = resized.flip(-1) if flip else resized
    return out


def to_device(values, device: torch.device | str) -> torch.Tensor:
    """A host array (numpy, tensor, list) on ``device``. To a GPU it goes through pinned memory
    without blocking: a plain copy from pageable memory would make the host wait for the GPU."""
    tensor = torch.as_tensor(values)
    if tensor.device.type != "cpu" or torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def cutout(images: torch.Tensor, record: Cutout) -> torch.Tensor:
    """Paint each sample's box with its fill (pixel space [0, 1]), in place."""
    fills = to_device(record.fill, images.device).to(images.dtype) / 255
    for i, (y1, y2, x1, x2) in enumerate(np.asarray(record.box).tolist()):
        images[i, :, y1:y2, x1:x2] = fills[i].view(-1, 1, 1)
    return images


def cutmix(images: torch.Tensor, perm, box) -> torch.Tensor:
    """Paste the box of sample perm[i] into sample i (SPEC.md section 4), returning a new tensor."""
    y1, y2, x1, x2 = np.asarray(box).tolist()
    mixed = images.clone()
    source = to_device(np.asarray(perm, dtype=np.int64), images.device)
    mixed[:, :, y1:y2, x1:x2] = images[source, :, y1:y2, x1:x2]
    return mixed


@functools.lru_cache(maxsize=16)
def _normalization(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as float32 [1, C, 1, 1] on ``device``, made once per device: never rebuilt per batch."""
    return tuple(to_device(np.asarray(v, dtype=np.float32), device).view(1, -1, 1, 1) for v in (mean, std))


def replay(
    images: torch.Tensor,
    record: Record,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The augmented, normalized batch of ``record``: float32 [B, C, size, size].

    ``images`` are all distilled images, uint8 [N, C, H, W] (CPU or ``device``). Gather
    img_idx, move to ``device``, scale to [0, 1], crop/resize/flip, cutout, CutMix, normalize.
    Relabel feeds this batch to the teacher and training feeds it to the student. Every host value
    reaches a GPU through ``to_device``, so a replay never waits for the device.
    """
    index = to_device(np.asarray(record.img_idx, dtype=np.int64), images.device)
    batch = to_device(images.index_select(0, index), device or images.device).to(torch.float32).div_(255)
    batch = crop_resize_flip(batch, record.crop, record.flip, size)
    if record.cutout is not None:
        cutout(batch, record.cutout)
    if record.mix_perm is not None:
        batch = cutmix(batch, record.mix_perm, record.mix_box)
    mean_t, std_t = _normalization(tuple(mean), tuple(std), batch.device)
    return batch.sub_(mean_t).div_(std_t)

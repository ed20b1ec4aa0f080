"""augment.py against independent references: torchvision's ops and sampling rule, float64 math."""
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from lpld import augment


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _torchvision_crop_flip(image: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    top, left, h, w = (int(v) for v in box)
    out = TF.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=False)
    return TF.hflip(out) if flip else out


@pytest.mark.parametrize("height,width,size", [(28, 28, 28), (37, 45, 16), (64, 64, 96)])
def test_crop_resize_flip_equals_torchvision(height, width, size):
    images = torch.rand(12, 3, height, width, generator=_generator(0))
    boxes = augment.sample_crop_boxes(_generator(1), 12, height, width)
    flips = augment.sample_flips(_generator(2), 12)
    ours = augment.crop_resize_flip(images, boxes, flips, size)
    for i in range(12):
        reference = _torchvision_crop_flip(images[i], boxes[i], bool(flips[i]), size)
        torch.testing.assert_close(ours[i], reference, rtol=0, atol=1e-6)
    assert flips.any() and not flips.all()


def test_crop_boxes_fit_and_follow_the_rrc_rule():
    boxes = augment.sample_crop_boxes(_generator(3), 4000, 40, 30, scale=(0.08, 1.0))
    top, left, h, w = boxes.T.astype(np.int64)
    assert boxes.dtype == np.int32 and boxes.shape == (4000, 4)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 30).all()
    assert (h >= 1).all() and (w >= 1).all()
    # Same distribution as torchvision's RandomResizedCrop.get_params (its own random stream).
    torch.manual_seed(0)
    image = torch.empty(3, 40, 30)
    ref = np.array([RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)])
    for ours_stat, ref_stat in [
        ((h * w / 1200).mean(), (ref[:, 2] * ref[:, 3] / 1200).mean()),
        (np.log(w / h).mean(), np.log(ref[:, 3] / ref[:, 2]).mean()),
        ((top / 40).mean(), (ref[:, 0] / 40).mean()),
    ]:
        assert abs(ours_stat - ref_stat) < 0.03


def test_crop_boxes_fall_back_to_the_centered_box():
    # No box of area fraction 0.99 with aspect in [3, 4] fits a square: torchvision's fallback.
    boxes = augment.sample_crop_boxes(_generator(4), 5, 20, 20, scale=(0.99, 1.0), ratio=(3.0, 4.0))
    # Aspect 1 is below the range: full width, height round(20 / 3) = 7, centered.
    assert (boxes == np.array([6, 0, 7, 20], dtype=np.int32)).all()


def test_cutmix_box_size_follows_lambda():
    for seed in range(50):
        mix = augment.sample_cutmix(_generator(seed), 16, 32, 32)
        assert sorted(mix.perm.tolist()) == list(range(16)) and 0.0 <= mix.lam < 1.0
        y1, y2, x1, x2 = mix.box.tolist()
        half = int(32 * math.sqrt(1 - mix.lam)) // 2
        assert 0 <= y1 <= y2 <= 32 and 0 <= x1 <= x2 <= 32
        assert y2 - y1 <= 2 * half and x2 - x1 <= 2 * half
        assert (y1 == 0 or y2 == 32 or y2 - y1 == 2 * half) and (x1 == 0 or x2 == 32 or x2 - x1 == 2 * half)


def test_samplers_are_reproducible_from_the_seed():
    first = augment.sample_crop_boxes(_generator(9), 64, 50, 50), augment.sample_cutmix(_generator(9), 8, 50, 50)
    again = augment.sample_crop_boxes(_generator(9), 64, 50, 50), augment.sample_cutmix(_generator(9), 8, 50, 50)
    other = augment.sample_crop_boxes(_generator(10), 64, 50, 50)
    assert (first[0] == again[0]).all() and not (first[0] == other).all()
    assert (first[1].perm == again[1].perm).all() and first[1].lam == again[1].lam


def _reference_replay(images_uint8, record, size, mean, std):
    """float64 torchvision crop/flip per sample, then cutout, CutMix and normalize by hand."""
    out = []
    for i, index in enumerate(record.img_idx.tolist()):
        image = images_uint8[index].to(torch.float64) / 255
        image = _torchvision_crop_flip(image, record.crop[i], bool(record.flip[i]), size)
        if record.cutout is not None:
            y1, y2, x1, x2 = record.cutout.box[i].tolist()
            image[:, y1:y2, x1:x2] = torch.tensor(record.cutout.fill[i], dtype=torch.float64).view(-1, 1, 1) / 255
        out.append(image)
    batch = torch.stack(out)
    if record.mix_perm is not None:
        y1, y2, x1, x2 = record.mix_box.tolist()
        mixed = batch.clone()
        for i, j in enumerate(record.mix_perm.tolist()):
            mixed[i, :, y1:y2, x1:x2] = batch[j, :, y1:y2, x1:x2]
        batch = mixed
    mean = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (batch - mean) / std


@pytest.mark.parametrize("mode", ["flip+cutmix", "cutout", "plain"])
def test_replay_matches_a_float64_reference(mode):
    generator = _generator(11)
    images = torch.randint(0, 256, (20, 3, 24, 30), generator=generator, dtype=torch.uint8)
    img_idx = torch.randperm(20, generator=generator)[:8].numpy()
    record = augment.Record(
        img_idx=img_idx,
        crop=augment.sample_crop_boxes(generator, 8, 24, 30),
        flip=augment.sample_flips(generator, 8) if mode != "cutout" else np.zeros(8, dtype=bool),
    )
    if mode == "cutout":
        record.cutout = augment.sample_cutout(generator, 8, 16, 16, 3)
    if mode == "flip+cutmix":
        mix = augment.sample_cutmix(generator, 8, 16, 16)
        record.mix_perm, record.mix_lam, record.mix_box = mix.perm, mix.lam, mix.box
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    ours = augment.replay(images, record, 16, mean, std)
    assert ours.dtype == torch.float32 and ours.shape == (8, 3, 16, 16)
    torch.testing.assert_close(ours.double(), _reference_replay(images, record, 16, mean, std), rtol=0, atol=2e-5)

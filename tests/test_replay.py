"""Replay: the DALI and torch back ends rebuild relabel's batch for record g; sampler/DataLoader order."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from torch import nn

from lpld import relabel, replay
from lpld.labels import LabelStore
from lpld.recipes import get_recipe

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
# DALI's float bilinear resize and torch's agree to about one float32 rounding step in [0, 1]
# pixel units (both are within ~6e-7 of a float64 resize); normalizing divides by std.
PIXEL_TOLERANCE = 2e-6


def make_store(path, images, *, epochs=3, batch=4, classes=5, size=12, mix="cutmix", flip="flip", seed=0):
    """A label store written by relabel itself, with a small linear teacher; returns (store, teacher)."""
    channels = images.shape[1]
    recipe = get_recipe("fmnist", [
        f"data.num_classes={classes}", f"data.channels={channels}", f"data.resolution={size}",
        f"data.mean={','.join(map(str, MEAN[:channels]))}", f"data.std={','.join(map(str, STD[:channels]))}",
        f"relabel.epochs={epochs}", f"relabel.batch_size={batch}", f"relabel.mix={mix}", f"relabel.flip={flip}",
        f"relabel.seed={seed}",
    ])
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, classes))
    header = relabel.label_header(recipe, images, "test-images", "test-teacher")
    relabel.generate(teacher, images, path, header)
    return LabelStore.open(path), teacher


def random_images(n=10, channels=3, side=16, seed=0):
    return torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def reference_batch(images, record, size, channels):
    """Independent of lpld.augment: torchvision's resized_crop + hflip per sample, float64, then paste."""
    import torchvision.transforms.v2.functional as F

    x = images[torch.as_tensor(record.img_idx, dtype=torch.long)].double() / 255
    out = []
    for i, (top, left, h, w) in enumerate(record.crop.tolist()):
        y = F.resized_crop(x[i], top, left, h, w, [size, size], antialias=False)
        out.append(F.horizontal_flip(y) if record.flip[i] else y)
    out = torch.stack(out)
    if record.cutout is not None:
        for i, (y1, y2, x1, x2) in enumerate(record.cutout.box.tolist()):
            out[i, :, y1:y2, x1:x2] = torch.as_tensor(record.cutout.fill[i], dtype=torch.float64).view(-1, 1, 1) / 255
    if record.mix_perm is not None:
        y1, y2, x1, x2 = record.mix_box.tolist()
        out[:, :, y1:y2, x1:x2] = out[torch.as_tensor(record.mix_perm, dtype=torch.long)][:, :, y1:y2, x1:x2].clone()
    mean = torch.tensor(MEAN[:channels], dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(STD[:channels], dtype=torch.float64).view(1, -1, 1, 1)
    return (out - mean) / std


def plan_of(store, seed=7):
    """A with-replacement plan (pure in the epoch), standing in for lpld.prune.plan."""
    ids = store.ids
    return lambda epoch: np.random.default_rng([seed, epoch]).choice(ids, size=store.batches_per_epoch).tolist()


@pytest.mark.dali
@pytest.mark.parametrize("mix,flip,channels", [("cutmix", "flip", 3), ("cutmix", "cutout", 3), ("none", "flip", 1)])
def test_dali_and_torch_replay_rebuild_relabels_batch(tmp_path, mix, flip, channels):
    images = random_images(channels=channels)
    size = 12
    store, teacher = make_store(tmp_path / "labels", images, mix=mix, flip=flip, size=size)
    sampler = replay.PlanSampler(plan_of(store))
    dali = replay.DaliLoader(store, images, sampler, size, MEAN[:channels], STD[:channels], torch.device("cpu"))
    dataset = replay.RecordDataset(store, images, size, MEAN[:channels], STD[:channels])
    tolerance = PIXEL_TOLERANCE / min(STD)
    for epoch in (0, 1, 4):  # 0 -> 1 continues the pipeline; 4 is a jump, which rebuilds it
        sampler.set_epoch(epoch)
        seen = []
        for batch in dali:
            record = store.record(batch.record)
            expected = reference_batch(images, record, size, channels)
            from_torch = dataset[batch.record]
            assert batch.images.dtype == torch.float32 and batch.images.shape == expected.shape
            torch.testing.assert_close(batch.images.double(), expected, atol=tolerance, rtol=0)
            torch.testing.assert_close(from_torch.images.double(), expected, atol=tolerance, rtol=0)
            torch.testing.assert_close(batch.images, from_torch.images, atol=tolerance, rtol=0)
            assert batch.logits.dtype == torch.float16
            assert torch.equal(batch.logits, from_torch.logits)
            # Relabel's teacher saw exactly these pixels: its logits come back up to fp16 rounding.
            with torch.no_grad():
                torch.testing.assert_close(teacher(batch.images).half(), batch.logits, atol=1e-3, rtol=1e-3)
            seen.append(batch.record)
        assert seen == sampler.records(epoch)


def test_dataloader_yields_the_plan_in_order_with_persistent_workers(tmp_path):
    images = random_images()
    store, _ = make_store(tmp_path / "labels", images, epochs=4)
    sampler = replay.PlanSampler(plan_of(store))
    dataset = replay.RecordDataset(store, images, 12, MEAN, STD)
    loader = replay.torch_loader(dataset, sampler, workers=2)
    assert loader.batch_size is None and loader.persistent_workers
    workers = None
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert [b.record for b in batches] == [int(g) for g in plan_of(store)(epoch)]
        for batch in batches:
            expected = reference_batch(images, store.record(batch.record), 12, 3)
            torch.testing.assert_close(batch.images.double(), expected, atol=PIXEL_TOLERANCE / min(STD), rtol=0)
            assert torch.equal(batch.logits, torch.from_numpy(store.record(batch.record).logits))
        pids = {w.pid for w in loader._iterator._workers}
        assert workers is None or pids == workers  # the same worker processes every epoch
        workers = pids


@pytest.mark.dali
def test_dali_batches_are_gathered_one_ahead_in_a_helper_thread(tmp_path):
    """The external source hands out what ``_gather`` makes for (epoch, iteration), prepared while the
    previous batch trains; past the epoch's last record it stops."""
    images = random_images()
    store, _ = make_store(tmp_path / "labels", images, mix="cutmix", flip="flip", size=12)
    sampler = replay.PlanSampler(plan_of(store), epoch=3)
    loader = replay.DaliLoader(store, images, sampler, 12, MEAN, STD, torch.device("cpu"))
    loader._first_epoch = 3  # as _build sets it for a pipeline started at epoch 3
    count = len(sampler.records(3))
    for k in range(count):
        batch = loader._batch(SimpleNamespace(epoch_idx=0, iteration=k))
        assert [np.array_equal(a, b) for a, b in zip(batch, loader._gather(3, k))] == [True] * len(batch)
        assert list(loader._ahead) == ([(3, k + 1)] if k + 1 < count else [])
    with pytest.raises(StopIteration):
        loader._batch(SimpleNamespace(epoch_idx=0, iteration=count))


def test_sampler_splits_ranks_and_keeps_its_epoch_in_state():
    plan = lambda epoch: list(range(10 * epoch, 10 * epoch + 7))  # noqa: E731
    ranks = [replay.PlanSampler(plan, epoch=2, rank=r, world_size=3) for r in range(3)]
    assert [list(s) for s in ranks] == [[20, 23], [21, 24], [22, 25]]
    assert sorted(g for s in ranks for g in s) == list(range(20, 26))
    restored = replay.PlanSampler(plan)
    restored.load_state_dict(ranks[0].state_dict())
    assert restored.epoch == 2 and list(restored) == plan(2)


def test_loader_choice(monkeypatch, capsys):
    assert replay.resolve_loader("auto", torch.device("cpu")) == "torch"
    monkeypatch.setattr(replay, "dali_available", lambda: True)
    assert replay.resolve_loader("auto", torch.device("cuda", 0)) == "dali"
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(replay, "dali_available", lambda: False)  # a GPU machine without DALI
    assert replay.resolve_loader("auto", torch.device("cuda", 0)) == "torch"
    notice = capsys.readouterr().err
    assert notice.count("\n") == 1 and "nvidia-dali is not installed" in notice and "replays with torch" in notice
    assert replay.resolve_loader("dali", torch.device("cuda", 0)) == "dali"  # asked for: DaliLoader says what to do
    with pytest.raises(replay.UserError, match="unknown loader"):
        replay.resolve_loader("pil", torch.device("cpu"))

"""Label store benchmarks: relabel throughput, bytes on disk and random-record latency (SPEC.md sections 4, 8).

The baseline is the upstream layout, simulated: one ``torch.save`` list per (epoch, batch) record
(coords float32 [B, 4], flip bool [B], perm int64 [B], lambda, box, fp16 logits [B, K]) and,
for augmentation, a per-sample torchvision v2 RandomResizedCrop + flip as in a per-sample
Dataset. Shapes: the fmnist demo (N=100, B=25, K=10) and an ImageNet-1K IPC10 slice
(N=10000, B=128, K=1000; a few records, sizes per record extrapolated to E=300).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from lpld import augment, prune, relabel
from lpld.labels import LabelStore, LabelStoreWriter
from lpld.models import build_model
from lpld.recipes import get_recipe

RESULTS: dict = {}
SHAPES = {  # name: (N, B, K, E, records written)
    "fmnist-ipc10": (100, 25, 10, 100, 400),
    "in1k-ipc10-slice": (10000, 128, 1000, 300, 40),
}


@pytest.fixture(scope="module", autouse=True)
def labels_results(write_benchmark_results):
    yield
    notes = ("best of 3 wall-clock runs per timing (machine.load_average says how busy the machine was); "
             "in1k-ipc10-slice writes 40 records and extrapolates bytes to E=300 (23,400 records)")
    write_benchmark_results("labels", RESULTS, notes)


def _timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("stacked", [1, 8])
def test_relabel_images_per_second(tmp_path, stacked):
    """Whole relabel (replay + ResNet-10 teacher + store writes) on the fmnist demo shape, with
    ``stacked`` records per teacher forward (``lpld relabel --images-per-forward``).

    The first run pays one-time kernel set-up and is reported as cold; the second run, into a
    fresh store, is the steady state. The baseline is the teacher's forward alone on the same
    replayed batches, stacked the same way: the ratio is what replay and storage cost on top of
    the teacher (below 1), or what preparing the next batch while the teacher runs wins back.
    """
    epochs, batch = 8, 25
    recipe = get_recipe("fmnist", [f"relabel.epochs={epochs}"])
    images = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    teacher = build_model(recipe.model.arch, 10, 1, recipe.model.stem).eval()
    header = relabel.label_header(recipe, images, "bench", "bench")
    count = epochs * 4 * batch
    seconds = {}
    for run in ("cold", "warm"):
        start = time.perf_counter()
        relabel.generate(teacher, images, tmp_path / run, header, records_per_forward=stacked)
        seconds[run] = time.perf_counter() - start
    store = LabelStore.open(tmp_path / "warm")
    replayed = [augment.replay(images, store.record(int(g)), 28, header["mean"], header["std"]) for g in store.ids]
    batches = [torch.cat(replayed[i:i + stacked]) for i in range(0, len(replayed), stacked)]
    with torch.inference_mode():
        forward = _timed(lambda: [teacher(x) for x in batches])
    RESULTS[f"relabel_fmnist_resnet10_{stacked}_records_per_forward"] = {
        "images": count, "records_per_forward": stacked, "cold_images_per_sec": count / seconds["cold"],
        "images_per_sec": count / seconds["warm"], "teacher_forward_only_images_per_sec": count / forward,
        "ratio_vs_forward_only": forward / seconds["warm"],
    }
    assert len(store) == epochs * 4


@pytest.mark.parametrize("side", [28, 224])
def test_replay_vs_per_sample_torchvision(side):
    """Batched replay of a record against per-sample RandomResizedCrop + flip (the Dataset way)."""
    batch = 128 if side == 224 else 25
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=generator)
    record = augment.Record(img_idx=np.arange(batch), crop=augment.sample_crop_boxes(generator, batch, side, side),
                            flip=augment.sample_flips(generator, batch))
    per_sample = v2.Compose([v2.RandomResizedCrop(side, antialias=False), v2.RandomHorizontalFlip(),
                             v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)])
    ours = _timed(lambda: augment.replay(images, record, side, [0.5] * 3, [0.25] * 3))
    theirs = _timed(lambda: torch.stack([per_sample(image) for image in images]))
    RESULTS[f"replay_{side}px_batch{batch}"] = {
        "replay_images_per_sec": batch / ours, "per_sample_torchvision_images_per_sec": batch / theirs,
        "ratio_vs_per_sample": theirs / ours,
    }
    assert ours > 0 and theirs > 0


def _records(generator, count, batch, classes, side):
    for _ in range(count):
        mix = augment.sample_cutmix(generator, batch, side, side)
        yield augment.Record(
            img_idx=np.zeros(batch, dtype=np.int32), crop=augment.sample_crop_boxes(generator, batch, side, side),
            flip=augment.sample_flips(generator, batch), mix_perm=mix.perm, mix_lam=mix.lam, mix_box=mix.box,
            logits=torch.randn(batch, classes, generator=generator).to(torch.float16).numpy(),
        )


def _write_upstream(folder, records, side):
    """One torch.save list per record, like upstream's epoch_e/batch_b.tar files."""
    folder.mkdir()
    for g, record in enumerate(records):
        coords = torch.from_numpy(record.crop.astype(np.float32) / side)
        torch.save([coords, torch.from_numpy(record.flip), torch.from_numpy(record.mix_perm.astype(np.int64)),
                    record.mix_lam, record.mix_box.tolist(), torch.from_numpy(record.logits)],
                   folder / f"batch_{g}.tar")


@pytest.mark.parametrize("name", list(SHAPES))
def test_bytes_on_disk_and_read_latency(tmp_path, name):
    n, batch, classes, epochs, count = SHAPES[name]
    side = 28 if name.startswith("fmnist") else 224
    records = list(_records(torch.Generator().manual_seed(1), count, batch, classes, side))
    header = {"num_images": n, "channels": 3, "image_size": [side, side], "batch_size": batch, "num_classes": classes,
              "epochs": epochs, "batches_per_epoch": n // batch, "size": side, "flip": "flip", "mix": "cutmix",
              "seeds": {"relabel": 0}, "prune": []}
    writer = LabelStoreWriter(tmp_path / "store", header, np.arange(count))
    for row, record in enumerate(records):
        writer.write(row, record)
    writer.finish()
    _write_upstream(tmp_path / "upstream", records, side)
    ours = sum(p.stat().st_size for p in (tmp_path / "store").iterdir())
    theirs = sum(p.stat().st_size for p in (tmp_path / "upstream").iterdir())

    store = LabelStore.open(tmp_path / "store")
    order = np.random.default_rng(0).integers(0, count, 200)
    read_ours = _timed(lambda: [store.record(int(g)) for g in order]) / len(order)
    read_theirs = _timed(lambda: [torch.load(tmp_path / "upstream" / f"batch_{g}.tar", weights_only=True)
                                  for g in order]) / len(order)
    full = epochs * (n // batch)
    RESULTS[f"storage_{name}"] = {
        "records": count, "bytes_per_record_store": ours / count, "bytes_per_record_torch_save": theirs / count,
        "files_store": len(list((tmp_path / "store").iterdir())), "files_torch_save_full_run": full,
        "full_run_gib_store": ours / count * full / 1024**3, "full_run_gib_torch_save": theirs / count * full / 1024**3,
        "bytes_ratio_torch_save_vs_store": theirs / ours,
        "pruned_run_gib_store": {f"{factor:g}x": ours / count * prune.kept_count(full, ratio) / 1024**3
                                 for ratio, factor in ((r, prune.compression_factor(r)) for r in (0.9, 0.95, 0.975, 0.99))},
        "random_read_us_store": read_ours * 1e6, "random_read_us_torch_load": read_theirs * 1e6,
        "read_speedup_vs_torch_load": read_theirs / read_ours,
    }
    assert ours < theirs


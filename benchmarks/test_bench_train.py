"""Student training throughput by data path: DALI replay, torch replay, resident tensors, per-sample PIL.

Every provider runs the same training step (``lpld.train.make_loss_fn`` + ``accumulate_gradients``
+ AdamW) over one epoch of records of the same label store; only where the batch comes from
changes:

- "resident": one batch of random normalized images and fp16 logits already on the device, used
  for every step. No data path at all: the ceiling the others are measured against.
- "dali": ``lpld.replay.DaliLoader`` (GPU pipeline on CUDA, DALI's CPU mode otherwise).
- "torch": ``lpld.replay.RecordDataset`` in a ``DataLoader(batch_size=None)`` with workers.
- "pil": the upstream way, per sample: open the distilled image file with PIL, crop/resize/flip it
  with PIL, ToTensor, Normalize, collate B samples, then CutMix in the main process.

GPU case (ImageNet-1K shape): ResNet-18 at 224 px, records of 128 images, 1000 classes,
torch.compile and bf16 autocast; target: DALI replay >= 0.9x the resident ceiling. CPU case
(Fashion-MNIST shape): ResNet-10 with the 3x3/stride-2 stem at 28 px, 1 channel, records of 64,
10 classes, eager, one torch thread (see ``notes``).
"""
import time

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.io import write_png
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from lpld import augment, bank, relabel, replay
from lpld import train as training
from lpld.labels import LabelStore
from lpld.models import build_model
from lpld.recipes import get_recipe

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    SHAPE = dict(arch="resnet18", stem="standard", side=224, channels=3, batch=128, classes=1000, images=2560,
                 workers=8, compile=True, rounds=2)
else:
    SHAPE = dict(arch="resnet10", stem="3x3s2", side=28, channels=1, batch=64, classes=10, images=2048,
                 workers=1, compile=False, rounds=3)
NO_DALI = pytest.mark.skipif(not replay.dali_available(), reason="nvidia-dali is not installed (the GPU check machine has none)")
# the per-sample PIL path (upstream's) is timed on the CPU only: on a GPU it is the slowest row and the check's budget is short
PROVIDERS = ["resident", pytest.param("dali", marks=NO_DALI), "torch",
             pytest.param("pil", marks=pytest.mark.skipif(CUDA, reason="timed on the CPU only"))]
ROWS: list[dict] = []


@pytest.fixture(scope="module")
def setup(tmp_path_factory, write_benchmark_results):
    """Distilled PNG files, one relabel epoch of records, and the recipe; writes the JSON at the end."""
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench-train")
    side, channels, classes = SHAPE["side"], SHAPE["channels"], SHAPE["classes"]
    generator = torch.Generator().manual_seed(0)
    for i in range(SHAPE["images"]):
        folder = root / "distilled" / f"c{i % classes:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        write_png(torch.randint(0, 256, (channels, side, side), dtype=torch.uint8, generator=generator),
                  str(folder / f"c{i % classes:05d}_i{i // classes:04d}.png"))
    mean, std = ",".join(["0.45"] * channels), ",".join(["0.25"] * channels)
    recipe = get_recipe("imagenet1k" if CUDA else "fmnist", [
        f"data.num_classes={classes}", f"data.channels={channels}", f"data.resolution={side}", f"data.mean={mean}",
        f"data.std={std}", f"model.arch={SHAPE['arch']}", f"model.stem={SHAPE['stem']}", "relabel.epochs=1",
        f"relabel.batch_size={SHAPE['batch']}", "relabel.mix=cutmix", f"train.compile={SHAPE['compile']}",
    ])
    distilled = bank.open(root / "distilled", channels)
    # A cheap stand-in teacher: the logits only need the right shape and dtype here.
    teacher = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes))
    header = relabel.label_header(recipe, distilled.images, distilled.fingerprint, "bench")
    relabel.generate(teacher, distilled.images, root / "labels", header)
    yield recipe, distilled, LabelStore.open(root / "labels"), root / "distilled"
    ceiling = next(row["images_per_sec"] for row in ROWS if row["provider"] == "resident")
    for row in ROWS:
        row["ratio_vs_resident"] = row["images_per_sec"] / ceiling
    notes = (f"{SHAPE}; one epoch = {SHAPE['images'] // SHAPE['batch']} records per round, median of "
             f"{SHAPE['rounds']} rounds after one warm-up epoch. GPU target: dali >= 0.9x resident. "
             + ("" if CUDA else "CPU: one torch thread for the step (with two, ops wait on the sibling "
                "core whenever the machine runs anything else), loaders with 1 worker / 1 DALI thread."))
    write_benchmark_results("train", ROWS, notes)
    torch.set_num_threads(threads)


class PerSamplePIL(Dataset):
    """Item (g, i): image i of record g decoded by PIL and cropped/flipped with the stored box."""

    def __init__(self, store, files, size, mean, std):
        self.store, self.files, self.size = store, files, size
        self.finish = v2.Compose([v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __getitem__(self, key):
        g, i = key
        record = self.store.record(g)
        image = Image.open(self.files[record.img_idx[i]])
        top, left, h, w = record.crop[i].tolist()
        image = F.resized_crop(image, top, left, h, w, [self.size, self.size], F.InterpolationMode.BILINEAR)
        if record.flip[i]:
            image = F.horizontal_flip(image)
        return self.finish(image), g


class PILBatches:
    """Collated per-sample batches plus the record's CutMix and logits, applied in the main process."""

    def __init__(self, store, files, sampler, size, mean, std, workers):
        batch = store.meta["batch_size"]
        self.store, self.sampler, self.batch = store, sampler, batch
        self.loader = DataLoader(PerSamplePIL(store, files, size, mean, std), batch_size=batch, num_workers=workers,
                                 sampler=self, persistent_workers=workers > 0)

    def __iter__(self):
        return iter([(int(g), i) for g in self.sampler for i in range(self.batch)])

    def __len__(self):
        return len(self.sampler) * self.batch

    def batches(self):
        for images, ids in self.loader:
            record = self.store.record(int(ids[0]))
            images = augment.cutmix(images, record.mix_perm, record.mix_box)
            yield replay.ReplayBatch(images, torch.from_numpy(record.logits), int(ids[0]))


def batches_of(provider, recipe, distilled, store, folder, sampler):
    mean, std, size = store.meta["mean"], store.meta["std"], store.meta["size"]
    if provider == "resident":
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(SHAPE["batch"], SHAPE["channels"], size, size, generator=generator).to(DEVICE)
        logits = torch.randn(SHAPE["batch"], SHAPE["classes"], generator=generator).to(DEVICE, torch.float16)
        return lambda: (replay.ReplayBatch(images, logits, g) for g in sampler)
    if provider == "pil":
        files = [str(folder / name) for name in distilled.files]
        return PILBatches(store, files, sampler, size, mean, std, SHAPE["workers"]).batches
    loader = replay.make_loader(provider, store, distilled.images, sampler, size, mean, std, DEVICE, SHAPE["workers"])
    return lambda: iter(loader)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_training_images_per_second(benchmark, setup, provider):
    recipe, distilled, store, folder = setup
    sampler = replay.PlanSampler(training.training_plan(store, 0))
    batches = batches_of(provider, recipe, distilled, store, folder, sampler)
    torch.manual_seed(0)
    model = build_model(SHAPE["arch"], SHAPE["classes"], SHAPE["channels"], SHAPE["stem"]).to(DEVICE)
    memory_format = torch.channels_last if CUDA else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = training.build_optimizer(model, recipe.train)
    loss_fn = training.make_loss_fn(model, recipe.train, DEVICE)
    losses, epochs = [], iter(range(10**6))

    def epoch():
        sampler.set_epoch(next(epochs))
        for batch in batches():
            images = batch.images.to(DEVICE, non_blocking=True).contiguous(memory_format=memory_format)
            optimizer.zero_grad(set_to_none=True)
            losses.append(training.accumulate_gradients(loss_fn, images, batch.logits.to(DEVICE)))
            optimizer.step()
        if CUDA:
            torch.cuda.synchronize()

    started = time.perf_counter()
    epoch()  # warm-up: compile, workers, DALI pipeline
    warmup = time.perf_counter() - started
    benchmark.pedantic(epoch, rounds=SHAPE["rounds"], iterations=1)
    images = len(sampler) * SHAPE["batch"]
    seconds = benchmark.stats.stats.median
    ROWS.append({"provider": provider, "images_per_sec": images / seconds, "seconds_per_epoch": seconds,
                 "images_per_epoch": images, "warmup_seconds": warmup})
    assert all(torch.isfinite(loss) for loss in losses)

"""ImageNet-shaped host-side scale: memory to the first batch, store opens, relabel, listings (issue 9).

Synthetic data shaped like the real thing, built once under ``LPLD_SCALE_DIR`` (default
/tmp/lpld-scale; about 25 GB of disk): an ImageNet-1K-shaped distilled set (1000 classes x IPC 50
of 224 px RGB PNGs, 7.5 GB as a uint8 bank) with a small IN-1K label store over it, an
ImageNet-21K-shaped label store (K = 10,450, B = 32, fp16 logits, 10 GB) and a tree of 100k
small files. Outside the default test run: ``python -m pytest benchmarks/test_bench_scale.py``.
Results go to benchmarks/results/scale-<machine>.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from lpld import bank, data, relabel
from lpld.labels import LabelStore, LabelStoreWriter
from lpld.models import build_model
from lpld.recipes import get_recipe

ROOT = Path(os.environ.get("LPLD_SCALE_DIR", "/tmp/lpld-scale" + ("-smoke" if os.environ.get("LPLD_SCALE_SMOKE") else "")))
REPO = Path(__file__).resolve().parents[1]
GB = 1e9
SMOKE = bool(os.environ.get("LPLD_SCALE_SMOKE"))  # a minute-long dry run of the same code at IPC 2
RESULTS: dict = {}
BUILDS = ROOT / "builds.json"  # how long building the data took, kept for reruns that reuse it
CLASSES, IPC, SIDE = 1000, 2 if SMOKE else 50, 224
# 15,000 x 32 x 10,450 x 2 bytes = 10.0 GB of logits, 15 epochs of 1000 records
IN21K = {"classes": 10450, "batch": 32, "records": 300 if SMOKE else 15000, "batches_per_epoch": 100 if SMOKE else 1000}


@pytest.fixture(scope="module", autouse=True)
def scale_results(write_benchmark_results):
    yield
    notes = (f"synthetic data under {ROOT}: IN-1K-shaped distilled set {CLASSES} classes x IPC {IPC} at {SIDE} px RGB "
             f"(bank {CLASSES * IPC * SIDE * SIDE * 3 / GB:.2f} GB), IN-21K-shaped store K={IN21K['classes']}, "
             f"B={IN21K['batch']}, {IN21K['records']} records; page cache warm unless a result says otherwise")
    if BUILDS.is_file():
        RESULTS["builds"] = json.loads(BUILDS.read_text())
    write_benchmark_results("scale-smoke" if SMOKE else "scale", RESULTS, notes)


def _record_build(name: str, result: dict) -> None:
    builds = json.loads(BUILDS.read_text()) if BUILDS.is_file() else {}
    BUILDS.write_text(json.dumps(dict(builds, **{name: result}), indent=1))


def _images_of_class(label: int) -> list[torch.Tensor]:
    """IPC distinct, smooth (so small as PNG) 224 px RGB images of one class."""
    y = torch.linspace(0, 1, SIDE).view(1, SIDE, 1)
    x = torch.linspace(0, 1, SIDE).view(1, 1, SIDE)
    images = []
    for i in range(IPC):
        phase = torch.tensor([label % 7, i % 11, (label + i) % 13], dtype=torch.float32).view(3, 1, 1)
        images.append(((torch.sin(6 * x + phase) * torch.cos(4 * y + phase / 3) + 1) * 127.5).to(torch.uint8))
    return images


@pytest.fixture(scope="module")
def distilled() -> Path:
    """The IN-1K-shaped distilled folder with its bank (built once; the build is timed)."""
    folder = ROOT / "in1k-distilled"
    if not (folder / bank.INDEX).is_file():
        for label in range(CLASSES):
            class_dir = folder / f"c{label:05d}"
            if class_dir.is_dir() and len(list(class_dir.glob("*.png"))) == IPC:
                continue  # written by an interrupted build (a class folder is complete once its last file is)
            class_dir.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(_images_of_class(label)):
                (class_dir / f"{i:03d}.png").write_bytes(encode_png(image).numpy().tobytes())
        start = time.perf_counter()
        bank.build(folder, 3, show_progress=False)
        _record_build("bank", {"images": CLASSES * IPC, "seconds": time.perf_counter() - start,
                               "bank_bytes": (folder / bank.BANK).stat().st_size, "threads": os.cpu_count()})
    return folder


@pytest.fixture(scope="module")
def in1k_labels(distilled) -> Path:
    """A small IN-1K label store over the distilled set: 1 epoch of records of 128 (390 records, 100 MB)."""
    path = ROOT / "in1k-labels"
    if not (path / "meta.json").is_file():
        recipe = get_recipe("imagenet1k", ["relabel.epochs=1"])
        images = bank.open(distilled, 3).images
        header = relabel.label_header(recipe, images, bank.open(distilled, 3).fingerprint, "synthetic")
        nb = header["batches_per_epoch"]
        writer = LabelStoreWriter(path, header, np.arange(nb))
        for row, record in enumerate(relabel.epoch_records(header, 0)):
            record.logits = np.full((header["batch_size"], CLASSES), row % 17, dtype=np.float16)
            writer.write(row, record)
        writer.finish()
    return path


@pytest.fixture(scope="module")
def in21k_store() -> Path:
    """The IN-21K-shaped store, logits filled chunk by chunk with a cheap pattern (hashing does not care)."""
    path = ROOT / "in21k-labels"
    if not (path / "meta.json").is_file():
        batch, classes, records, nb = IN21K["batch"], IN21K["classes"], IN21K["records"], IN21K["batches_per_epoch"]
        header = {"num_images": nb * batch, "channels": 3, "image_size": [SIDE, SIDE], "batch_size": batch,
                  "num_classes": classes, "epochs": records // nb, "batches_per_epoch": nb, "size": SIDE,
                  "mean": [0.0] * 3, "std": [1.0] * 3, "crop_scale": [0.08, 1.0], "flip": "cutout", "mix": "none",
                  "seeds": {"relabel": 0}, "topk": 0, "quant": "fp16", "prune": [],
                  "dataset_fingerprint": "synthetic", "teacher_fingerprint": "synthetic"}
        writer = LabelStoreWriter(path, header, np.arange(records))
        chunk = (np.arange(batch * classes) % 2048).astype(np.float16).reshape(1, batch, classes)
        for start in range(0, records, 256):
            stop = min(start + 256, records)
            writer.arrays["logits"][start:stop] = chunk + np.float16(start % 97)
            writer.arrays["img_idx"][start:stop] = np.arange(batch, dtype=np.int32)
            writer.arrays["crop"][start:stop] = [0, SIDE, 0, SIDE]
        start = time.perf_counter()
        writer.finish()
        _record_build("in21k_store_finish_with_hashing", {"seconds": time.perf_counter() - start,
                                                          "bytes": sum(f.stat().st_size for f in path.glob("*.npy"))})
    return path


def _tree_pss(root_pid: int) -> int:
    """Proportional set size (bytes) of a process and all its descendants: pages shared through
    the page cache (the bank's memory map) count once, split between the processes mapping them."""
    children = {}
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(status.parent.name))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:"))
    return total


def _run_measured(command: list[str]) -> tuple[list[dict], int, float]:
    """Run ``command``; its JSON lines, the peak PSS of its process tree (sampled every 20 ms), seconds."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_pss(process.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = process.communicate()
    done.set()
    sampler.join()
    assert process.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], peak, time.perf_counter() - start


@pytest.mark.parametrize("ranks", [1, 2])
def test_memory_and_time_to_first_batch(distilled, in1k_labels, ranks):
    """Peak PSS of the whole process tree from start to the first training batch, and the time."""
    script = ["-m", "benchmarks.scale_first_batch", "--distilled", str(distilled), "--labels", str(in1k_labels)]
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                    str(ranks), "--master_port", "29517"]
    lines, peak, wall = _run_measured([*launcher, *script])
    bank_bytes = (distilled / bank.BANK).stat().st_size
    RESULTS[f"first_batch_{ranks}_rank"] = {
        "ranks": ranks, "peak_pss_bytes": peak, "bank_bytes": bank_bytes, "target_bytes": bank_bytes + 1.5 * GB,
        "meets_memory_target": peak <= bank_bytes + 1.5 * GB,
        "seconds_to_first_batch": max(line["seconds_to_first_batch"] for line in lines), "wall_seconds": wall,
        "phase_seconds_per_rank": [line["phases"] for line in lines],
        "batch_shape_per_rank": [line["batch"] for line in lines]}
    assert len(lines) == ranks


def test_store_open_first_and_later(in21k_store):
    """The first open of a copied store hashes everything (``labels verify`` does the same); later
    opens trust the stamp."""
    start = time.perf_counter()
    store = LabelStore.open(in21k_store, trust_stamp=False)
    first = time.perf_counter() - start
    size = sum(f.stat().st_size for f in in21k_store.glob("*.npy"))
    later = []
    for _ in range(5):
        start = time.perf_counter()
        LabelStore.open(in21k_store)
        later.append(time.perf_counter() - start)
    RESULTS["in21k_store_open"] = {"bytes": size, "first_seconds": first, "first_gb_per_sec": size / GB / first,
                                   "hashing_seconds_per_array": store.hashed, "later_seconds_best_of_5": min(later),
                                   "later_seconds_all": later}


def test_relabel_at_224_px(distilled):
    """Relabel (replay + teacher + store, several records per forward) against the teacher's forward
    alone on the same batches: ResNet-18 at 224 px, 4 records of 128 from the bank."""
    recipe = get_recipe("imagenet1k", ["relabel.epochs=1"])
    images = bank.open(distilled, 3).images
    header = relabel.label_header(recipe, images, "synthetic", "synthetic")
    teacher = build_model("resnet18", CLASSES, 3, "standard").eval()
    ids, per_forward = np.arange(4), 2
    relabel.generate(teacher, images, ROOT / "relabel-warmup", header, ids[:1], records_per_forward=1)
    start = time.perf_counter()
    relabel.generate(teacher, images, ROOT / f"relabel-{time.time_ns()}", header, ids, records_per_forward=per_forward)
    seconds = time.perf_counter() - start
    from lpld import augment

    records = relabel.epoch_records(header, 0)[:4]
    batches = [torch.cat([augment.replay(images, r, SIDE, header["mean"], header["std"]) for r in records[i:i + per_forward]])
               for i in range(0, 4, per_forward)]
    with torch.inference_mode():
        start = time.perf_counter()
        for batch in batches:
            teacher(batch)
        forward = time.perf_counter() - start
    count = 4 * header["batch_size"]
    RESULTS["relabel_224px_resnet18"] = {"images": count, "records_per_forward": per_forward,
                                         "images_per_sec": count / seconds, "teacher_forward_only_images_per_sec": count / forward,
                                         "ratio_vs_forward_only": forward / seconds, "torch_threads": torch.get_num_threads()}


def test_listing_100k_files():
    """data.list_images over 1000 folders of 100 small files: a first scan, then the cached listing."""
    tree = ROOT / "tree-100k"
    folders = [tree / f"n{c:08d}" for c in range(1000)]
    if not (tree / "done").exists():
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(100):
                (folder / f"{i:04d}.jpg").write_bytes(b"x" * (i + 1))
        (tree / "done").touch()
        time.sleep(data.SETTLED_NS / 1e9 + 0.5)  # the cache is written only for folders that settled
    cache = ROOT / f"listing-{time.time_ns()}.txt"
    start = time.perf_counter()
    names, fingerprint = data.list_images(folders, cache)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = data.list_images(folders, cache)
    cached = time.perf_counter() - start
    assert again == (names, fingerprint) and sum(map(len, names)) == 100_000
    RESULTS["listing_100k_files"] = {"files": 100_000, "folders": 1000, "first_seconds": first, "cached_seconds": cached}

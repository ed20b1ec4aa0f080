"""lpld import labels on LPQLD's flat label directories, written here in its format with our own code:
top-k values and indices kept value for value (MR: the kept logits' softmax, zero elsewhere, as LPQLD
trains), fp16 crop coords recovered to the integer boxes, CutMix and flips, the per-batch order file,
a pruned run, and files that would run code refused."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lpld import augment, upstream
from lpld.cli import main
from lpld.errors import UserError
from lpld.labels import LabelStore

from test_upstream import BATCH, CLASSES, EPOCHS, IPC, SIZE, imported_images, reference_orders  # noqa: F401

TOPK = 3


def write_lpqld_labels(root: Path, records: int | None = None, topk: int = TOPK, seed: int = 3) -> dict[int, dict]:
    """Batch files as LPQLD's generator writes them: a global counter across epochs, fp16 coords of integer
    boxes, uint8 CutMix index and box, top-k fp16 logits with int16 indices, and the order file."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    root.mkdir(parents=True)
    written, orders, n = {}, {}, 0
    for batches in reference_orders(CLASSES * IPC, BATCH, EPOCHS, drop_last=records is not None):
        for indices in batches:
            if records is not None and n == records:
                break
            size = len(indices)
            h, w = rng.integers(1, SIZE + 1, size), rng.integers(1, SIZE + 1, size)
            top, left = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
            coords = torch.tensor(np.stack([top, left, h, w], 1) / SIZE, dtype=torch.float32).half()
            flips = torch.tensor([bool(v) for v in rng.integers(0, 2, size)])
            perm, lam = torch.randperm(size).to(torch.uint8), float(rng.beta(1.0, 1.0))
            cut = int(SIZE * np.sqrt(1.0 - lam))
            cx, cy = rng.integers(SIZE), rng.integers(SIZE)
            box = [torch.tensor(int(np.clip(v, 0, SIZE)), dtype=torch.uint8)
                   for v in (cx - cut // 2, cy - cut // 2, cx + cut // 2, cy + cut // 2)]
            logits = torch.randn(size, CLASSES) * 8
            best = logits.topk(topk, dim=1)
            torch.save([coords, flips, perm, lam, box, best.values.half(), best.indices.to(torch.int16)],
                       root / f"batch_{n}.tar")
            orders[str(n)] = indices
            written[n] = {"indices": indices, "crop": np.stack([top, left, h, w], 1), "flip": flips, "perm": perm,
                          "box": [int(v) for v in box], "values": best.values.half(), "classes": best.indices}
            n += 1
    (root / "sampler_indices_batch.json").write_text(json.dumps(orders))
    return written


def test_top_k_records_value_for_value(tmp_path, imported_images):  # noqa: F811
    recipe, workdir, _ = imported_images("imagenet1k")
    written = write_lpqld_labels(tmp_path / "lpqld")
    assert main(["import", "labels", str(tmp_path / "lpqld"), "--recipe", "imagenet1k", "--workdir", str(workdir.root),
                 "--set", f"data.num_classes={CLASSES}", "--set", f"relabel.epochs={EPOCHS}"]) == 0
    store = LabelStore.open(workdir.labels)
    assert (store.meta["topk"], store.meta["imported_from"]["format"]) == (TOPK, "lpqld")
    assert store.meta["imported_from"]["partial_batches_dropped"] == EPOCHS  # 10 images in batches of 4
    full_batches = [n for n, source in written.items() if len(source["indices"]) == BATCH]
    assert len(store) == len(full_batches) == EPOCHS * 2
    for g, n in enumerate(full_batches):
        source, record = written[n], store.record(g)
        assert record.img_idx.tolist() == source["indices"]
        np.testing.assert_array_equal(record.crop, source["crop"])  # fp16 coords back to the integer boxes
        np.testing.assert_array_equal(record.flip, source["flip"].numpy())
        np.testing.assert_array_equal(record.mix_perm, source["perm"].numpy())
        x1, y1, x2, y2 = source["box"]
        images = torch.rand(BATCH, 3, SIZE, SIZE, dtype=torch.float64)
        pasted = images.clone()
        pasted[:, :, x1:x2, y1:y2] = images[source["perm"].long(), :, x1:x2, y1:y2]
        assert torch.equal(augment.cutmix(images, record.mix_perm, record.mix_box), pasted)
        logits = torch.from_numpy(record.logits).double()
        kept = logits.gather(1, source["classes"])
        assert torch.equal(kept, source["values"].double())  # value for value
        assert torch.isinf(logits).sum() == BATCH * (CLASSES - TOPK)
        for temperature in (1.0, 20.0):  # LPQLD's MR-k target: softmax of the kept logits at T, zero elsewhere
            target = torch.zeros(BATCH, CLASSES, dtype=torch.float64).scatter(
                1, source["classes"], torch.softmax(source["values"].double() / temperature, 1))
            torch.testing.assert_close(torch.softmax(logits / temperature, 1), target, rtol=1e-12, atol=1e-15)


def test_a_pruned_run_keeps_what_exists_and_names_its_ratio(tmp_path, imported_images):  # noqa: F811
    recipe, workdir, _ = imported_images("imagenet1k", f"relabel.epochs={EPOCHS}")
    write_lpqld_labels(tmp_path / "lpqld", records=3)  # fewer than E x nb = 4: LPQLD's short pruned count
    with pytest.raises(UserError, match="pass --ratio"):
        upstream.import_lpqld_labels(tmp_path / "lpqld", recipe, workdir)
    store = LabelStore.open(upstream.import_lpqld_labels(tmp_path / "lpqld", recipe, workdir, ratio=0.25))
    assert store.path.name == "labels-r0.25" and len(store) == 3 and store.meta["prune"][-1]["ratio"] == 0.25
    assert store.ids.tolist() == [0, 1, 2]


def test_files_that_would_run_code_and_gaps_are_refused(tmp_path, imported_images):  # noqa: F811
    recipe, workdir, _ = imported_images("imagenet1k", f"relabel.epochs={EPOCHS}")
    write_lpqld_labels(tmp_path / "lpqld")
    torch.save([argparse.Namespace(a=1)] * 7, tmp_path / "lpqld" / "batch_0.tar")  # an object to build
    with pytest.raises(UserError, match="refused without running it"):
        upstream.import_lpqld_labels(tmp_path / "lpqld", recipe, workdir)
    (tmp_path / "lpqld" / "batch_1.tar").unlink()
    with pytest.raises(UserError, match="none missing"):
        upstream.import_lpqld_labels(tmp_path / "lpqld", recipe, workdir)


def test_an_interrupted_import_resumes_its_complete_epochs(tmp_path, imported_images, monkeypatch):  # noqa: F811
    """Stopped in the second epoch, the import keeps the first: the rerun reads only what is left and
    writes the store an uninterrupted import writes."""
    from lpld import upstream_lpqld

    recipe, workdir, _ = imported_images("imagenet1k", f"relabel.epochs={EPOCHS}")
    write_lpqld_labels(tmp_path / "lpqld")
    reference = LabelStore.open(upstream.import_lpqld_labels(tmp_path / "lpqld", recipe, workdir, out=tmp_path / "whole"))
    read, original, stopped = [], upstream_lpqld.load_plain, []

    def reading(path, *args):
        read.append(Path(path).name)
        if Path(path).name == "batch_4.tar" and not stopped:  # epoch 1's second full batch, the first time
            stopped.append(True)
            raise RuntimeError("the job was stopped here")
        return original(path, *args)

    monkeypatch.setattr(upstream_lpqld, "load_plain", reading)
    with pytest.raises(RuntimeError, match="stopped here"):
        upstream.import_lpqld_labels(tmp_path / "lpqld", recipe, workdir, out=tmp_path / "resumed")
    read.clear()
    store = LabelStore.open(upstream.import_lpqld_labels(tmp_path / "lpqld", recipe, workdir, out=tmp_path / "resumed"))
    assert "batch_0.tar" not in read[1:] and "batch_1.tar" not in read  # epoch 0 (files 0, 1; 2 is partial) kept
    for g in range(len(reference)):
        assert np.array_equal(store.record(g).logits, reference.record(g).logits)
        assert np.array_equal(store.record(g).img_idx, reference.record(g).img_idx)

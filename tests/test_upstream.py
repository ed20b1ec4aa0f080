"""``lpld import``: files written in upstream's formats by code of ours, imported, and compared
value by value with what was written (float64 for logits, crops and mixes), with independent
references for the two conversions that are not copies: PIL's crop at upstream's float box, and
PIL's inclusive rectangle for the ImageNet-21K-P cutout. Nothing here loads a pickle with code."""
from __future__ import annotations

import argparse
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lpld import augment, bank, models, recover, torchfiles, train, upstream
from lpld.errors import UserError
from lpld.labels import LabelStore
from lpld.recipes import get_recipe
from lpld.stats import ClassBNStats
from lpld.workdir import WorkDir

SIZE = 16


def recipe_for(name: str, *overrides: str):
    return get_recipe(name, [f"data.resolution={SIZE}", "relabel.epochs=2", *overrides])


def random_state(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state filled with distinct values (running var kept positive)."""
    state = {}
    for key, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            fresh = torch.randn(value.shape, generator=generator)
            state[key] = fresh.abs() + 0.1 if key.endswith("running_var") else fresh
        else:
            state[key] = torch.randint(0, 1000, value.shape, generator=generator).to(value.dtype)
    return state


# ------------------------------------------------------------------------------------------ teachers

def test_class_bn_checkpoint_gives_teacher_and_statistics(tmp_path):
    recipe = recipe_for("imagenet1k", "data.num_classes=5")
    generator = torch.Generator().manual_seed(0)
    model = models.build_model("resnet18", 5)
    state = random_state(model, generator)
    written = {}
    for name, bn in models.bn_layers(model):
        written[name] = (torch.randn(5, bn.num_features, generator=generator),
                         torch.rand(5, bn.num_features, generator=generator) + 0.5)
        state[f"{name}.class_running_mean"], state[f"{name}.class_running_var"] = written[name]
    torch.save({"model": state}, tmp_path / "resnet18_0.pth")
    workdir = WorkDir(tmp_path / "run")

    upstream.import_teacher(tmp_path / "resnet18_0.pth", recipe, workdir)

    teacher = models.load_teacher(workdir.teacher, recipe)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, state[key]), key
    stats = ClassBNStats.load(workdir.stats, teacher, 5, models.model_fingerprint(teacher))
    assert list(stats.layers) == [name for name, _ in models.bn_layers(model)] and len(stats.layers) == 20
    for name, (mean, var) in written.items():
        assert torch.equal(stats.layers[name].mean.double(), mean.double())
        assert torch.equal(stats.layers[name].var.double(), var.double())
    targets, _ = recover.load_targets(recipe, workdir, teacher, models.model_fingerprint(teacher), "cpu")
    assert torch.equal(targets.mean, torch.cat([written[name][0] for name, _ in models.bn_layers(model)], dim=1))
    with pytest.raises(UserError, match="exists"):
        upstream.import_teacher(tmp_path / "resnet18_0.pth", recipe, workdir)


def test_tiny_checkpoint_drops_training_state(tmp_path, capsys):
    recipe = recipe_for("tiny", "data.num_classes=7")
    model = models.build_model("resnet18", 7, stem="3x3")
    state = random_state(model, torch.Generator().manual_seed(1))
    checkpoint = {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.2, "params": [0, 1]}]},
                  "lr_scheduler": {"last_epoch": 50, "_last_lr": [0.0]}, "epoch": 49,
                  "args": argparse.Namespace(model="resnet18", lr=0.2, epochs=50)}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    workdir = WorkDir(tmp_path / "run")

    summary = upstream.import_teacher(tmp_path / "checkpoint.pth", recipe, workdir)

    teacher = models.load_teacher(workdir.teacher, recipe)
    assert all(torch.equal(value, state[key]) for key, value in teacher.state_dict().items())
    assert not workdir.stats.exists() and summary["stats"] is None
    assert "dropped args, epoch, lr_scheduler, optimizer" in capsys.readouterr().out


def test_in21k_checkpoint_with_module_prefix(tmp_path):
    recipe = recipe_for("imagenet21k", "data.num_classes=6")
    model = models.build_model("resnet18", 6)
    state = random_state(model, torch.Generator().manual_seed(2))
    kept = {f"module.{key}": value for key, value in state.items() if "num_batches_tracked" not in key}
    torch.save({"state_dict": kept}, tmp_path / "resnet18_21k.pth")
    workdir = WorkDir(tmp_path / "run")

    summary = upstream.import_teacher(tmp_path / "resnet18_21k.pth", recipe, workdir)

    teacher = models.load_teacher(workdir.teacher, recipe)
    for key, value in teacher.state_dict().items():
        expected = torch.zeros_like(value) if "num_batches_tracked" in key else state[key]
        assert torch.equal(value, expected), key
    assert "removed the 'module.' prefix" in summary["notes"]
    assert any("num_batches_tracked" in note for note in summary["notes"])


def test_unknown_keys_are_named(tmp_path):
    recipe = recipe_for("imagenet1k", "data.num_classes=5")
    state = models.build_model("resnet18", 5).state_dict()
    state["head.extra.weight"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "odd.pth")
    with pytest.raises(UserError, match="head.extra.weight"):
        upstream.import_teacher(tmp_path / "odd.pth", recipe, WorkDir(tmp_path / "run"))


class _Bomb:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Plain:
    pass


@pytest.mark.parametrize("payload", ["bomb", "instance"])
def test_code_in_a_file_is_refused_and_never_runs(tmp_path, imported_images, payload):
    recipe, workdir, _ = imported_images("imagenet1k")
    marker = tmp_path / "ran"
    evil = _Bomb(marker) if payload == "bomb" else _Plain()
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "epoch": evil}, tmp_path / "teacher.pth")
    os.makedirs(tmp_path / "labels" / "epoch_0")
    torch.save([torch.zeros(BATCH, 4), torch.zeros(BATCH, dtype=torch.bool), None, None, evil,
                torch.zeros(BATCH, CLASSES)], tmp_path / "labels" / "epoch_0" / "batch_0.tar")
    with pytest.raises(UserError, match="something other than tensors and plain values"):
        upstream.import_teacher(tmp_path / "teacher.pth", recipe, workdir)
    with pytest.raises(UserError, match="something other than tensors and plain values"):
        upstream.import_labels(tmp_path / "labels", recipe, workdir)
    assert not marker.exists()


def test_numpy_1_scalar_name_is_accepted(tmp_path):
    """Upstream's files were pickled under numpy 1.x, whose int64 scalar lives in numpy.core."""
    buffer = io.BytesIO()
    torch.save([np.clip(7, 0, 5), np.int64(3)], buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(tmp_path / "old.tar", "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            target.writestr(info, data)
    assert torchfiles.load_plain(tmp_path / "old.tar", torchfiles.numpy_int64_globals()) == [5, 3]


# ------------------------------------------------------------------------------------------- images

def test_class_order_past_1000_classes():
    names = [f"new{c:03d}" for c in range(1200)]
    shuffled = list(np.random.default_rng(0).permutation(names))
    assert upstream.class_id_order(shuffled) == names
    assert sorted(names) != names  # new1000 sorts before new101 as strings
    listing = {c: (f"new{c:03d}", [(0, f"class{c:03d}_id000.jpg")]) for c in range(1200)}
    assert upstream.upstream_to_ours(listing) == [int(name[3:]) for name in sorted(names)]
    with pytest.raises(UserError, match="new000_it100"):
        upstream.class_id_order(["new000", "new000_it100"])


def write_upstream_images(root: Path, classes: int, ipc: int, ext: str = "png") -> dict[tuple[int, int], np.ndarray]:
    rng = np.random.default_rng(3)
    pixels = {}
    for c in range(classes):
        (root / f"new{c:03d}").mkdir(parents=True)
        for k in range(ipc):
            pixels[c, k] = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels[c, k]).save(root / f"new{c:03d}" / f"class{c:03d}_id{k:03d}.{ext}")
    return pixels


def test_import_images_copies_upstream_folders(tmp_path):
    recipe = recipe_for("imagenet1k", "data.num_classes=4")
    write_upstream_images(tmp_path / "syn", 4, 3, "jpg")
    workdir = WorkDir(tmp_path / "run")

    upstream.import_images(tmp_path / "syn", recipe, workdir)

    distilled = bank.open(workdir.distilled, 3)
    assert distilled.labels.tolist() == [c for c in range(4) for _ in range(3)]
    for index, relative in enumerate(distilled.files):
        c, k = index // 3, index % 3
        assert (workdir.distilled / relative).read_bytes() == \
            (tmp_path / "syn" / f"new{c:03d}" / f"class{c:03d}_id{k:03d}.jpg").read_bytes()
    manifest = json.loads((workdir.distilled / "manifest.json").read_text())
    assert manifest["upstream_to_ours"] == list(range(12))
    with pytest.raises(UserError, match="holds 4 classes but the recipe has 5"):
        upstream.import_images(tmp_path / "syn", recipe_for("imagenet1k", "data.num_classes=5"), WorkDir(tmp_path / "b"))


# ------------------------------------------------------------------------------------------- labels

CLASSES, IPC, BATCH, EPOCHS = 5, 2, 4, 2  # N = 10: two full batches and a partial one of 2 per epoch


def reference_orders(num_images: int, batch: int, epochs: int, drop_last: bool = False) -> list[list[list[int]]]:
    """The indices upstream's own DataLoader hands out, batch by batch (what its files go with);
    it drops the last partial batch in its --prune_ratio runs."""
    dataset = torch.utils.data.TensorDataset(torch.arange(num_images))
    sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(42))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, drop_last=drop_last)
    return [[indices.tolist() for (indices,) in loader] for _ in range(epochs)]


def write_upstream_labels(root: Path, dtype: torch.dtype, mix: bool, cutout: bool, seed: int,
                          records: int | None = None) -> dict[tuple[int, int], dict]:
    """Batches as upstream's relabel writes them, from integer crops, flips, cutouts and CutMix boxes;
    with ``records``, only the first ones and no partial batches (its --prune_ratio runs)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    written, count = {}, 0
    for epoch, batches in enumerate(reference_orders(CLASSES * IPC, BATCH, EPOCHS, drop_last=records is not None)):
        (root / f"epoch_{epoch}").mkdir(parents=True)
        for b, indices in enumerate(batches):
            if records is not None and count == records:
                return written
            n = len(indices)
            h, w = rng.integers(1, SIZE + 1, n), rng.integers(1, SIZE + 1, n)
            top, left = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
            coords = torch.stack([torch.FloatTensor((top[i] / SIZE, left[i] / SIZE, h[i] / SIZE, w[i] / SIZE))
                                  for i in range(n)])
            if cutout:
                cut = int(0.5 * SIZE + 0.5)
                second = torch.stack([torch.FloatTensor([rng.integers(SIZE) / SIZE, rng.integers(SIZE) / SIZE, cut / SIZE,
                                                         cut / SIZE, *rng.integers(0, 256, 3).tolist()]) for _ in range(n)])
            else:
                second = torch.tensor([bool(v) for v in rng.integers(0, 2, n)])
            perm = lam = box = None
            if mix:
                perm, lam = torch.randperm(n), float(rng.beta(1.0, 1.0))
                cut_w = cut_h = int(SIZE * np.sqrt(1.0 - lam))
                cx, cy = rng.integers(SIZE), rng.integers(SIZE)
                box = [np.clip(cx - cut_w // 2, 0, SIZE), np.clip(cy - cut_h // 2, 0, SIZE),
                       np.clip(cx + cut_w // 2, 0, SIZE), np.clip(cy + cut_h // 2, 0, SIZE)]
            logits = (torch.randn(n, CLASSES) * 8).to(dtype)
            torch.save([coords, second, perm, lam, box, logits], root / f"epoch_{epoch}" / f"batch_{b}.tar")
            written[epoch, b] = {"indices": indices, "crop": np.stack([top, left, h, w], 1), "coords": coords,
                                 "second": second, "perm": perm, "lam": lam, "box": box, "logits": logits}
            count += 1
    return written


@pytest.fixture
def imported_images(tmp_path):
    def make(name: str, *overrides: str) -> tuple:
        recipe = recipe_for(name, f"data.num_classes={CLASSES}", *overrides)
        pixels = write_upstream_images(tmp_path / "syn", CLASSES, IPC)
        workdir = WorkDir(tmp_path / "run")
        upstream.import_images(tmp_path / "syn", recipe, workdir)
        return recipe, workdir, pixels
    return make


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("mix", [True, False])
def test_soft_labels_record_by_record(tmp_path, imported_images, dtype, mix):
    recipe, workdir, pixels = imported_images("imagenet1k", f"relabel.mix={'cutmix' if mix else 'none'}")
    written = write_upstream_labels(tmp_path / "fkd", dtype, mix, cutout=False, seed=5)
    if mix:  # upstream's own record of the order: used, and the regenerated one agrees with it
        orders = reference_orders(CLASSES * IPC, BATCH, EPOCHS)
        (tmp_path / "fkd" / "sampler_indices_epoch.json").write_text(
            json.dumps({str(e): sum(batches, []) for e, batches in enumerate(orders)}))

    out = upstream.import_labels(tmp_path / "fkd", recipe, workdir)

    distilled = bank.open(workdir.distilled, 3)
    store = LabelStore.open(out, expect_images=len(distilled.images), expect_classes=CLASSES)
    assert len(store) == EPOCHS * 2 and store.meta["imported_from"]["partial_batches_dropped"] == EPOCHS
    assert store.meta["imported_from"]["order"]["source"] == ("sampler_indices_epoch.json" if mix else "regenerated")
    assert store.meta["imported_from"]["order"].get("regenerated_differs_in_epochs", []) == []
    train._check_store_fits(store, distilled, recipe)
    for g in range(len(store)):
        epoch, b = divmod(g, 2)
        source, record = written[epoch, b], store.record(g)
        assert record.img_idx.tolist() == source["indices"]  # 5 classes: upstream's listing is class order
        np.testing.assert_array_equal(record.crop.astype(np.float64), source["crop"].astype(np.float64))
        for i, index in enumerate(record.img_idx.tolist()):
            c, k = divmod(index, IPC)
            top, left, h, w = (source["coords"][i] * torch.tensor([SIZE] * 4)).tolist()  # upstream's replay box
            expected = np.asarray(Image.fromarray(pixels[c, k]).crop((left, top, left + w, top + h)))
            t, l, hh, ww = record.crop[i].tolist()
            np.testing.assert_array_equal(distilled.images[index, :, t:t + hh, l:l + ww].permute(1, 2, 0).numpy(), expected)
        np.testing.assert_array_equal(record.flip, source["second"].numpy())
        np.testing.assert_array_equal(record.logits.astype(np.float64), source["logits"].half().double().numpy())
        if dtype == torch.float32:
            assert np.abs(record.logits.astype(np.float64) - source["logits"].double().numpy()).max() < 0.02
        if mix:
            np.testing.assert_array_equal(record.mix_perm.astype(np.float64), source["perm"].double().numpy())
            assert record.mix_lam == source["lam"]
            x1, y1, x2, y2 = (int(v) for v in source["box"])
            images = torch.rand(BATCH, 3, SIZE, SIZE, dtype=torch.float64)
            pasted = images.clone()
            pasted[:, :, x1:x2, y1:y2] = images[source["perm"], :, x1:x2, y1:y2]  # upstream's paste
            assert torch.equal(augment.cutmix(images, record.mix_perm, record.mix_box), pasted)
        else:
            assert record.mix_perm is None
    batch = augment.replay(distilled.images, store.record(0), SIZE, recipe.data.mean, recipe.data.std)
    assert batch.shape == (BATCH, 3, SIZE, SIZE)


def test_in21k_cutout_records_paint_upstreams_rectangles(tmp_path, imported_images):
    recipe, workdir, _ = imported_images("imagenet21k")
    written = write_upstream_labels(tmp_path / "fkd", torch.float16, mix=False, cutout=True, seed=6)

    store = LabelStore.open(upstream.import_labels(tmp_path / "fkd", recipe, workdir))

    assert store.meta["flip"] == "cutout" and len(store) == 4
    for g in range(len(store)):
        source, record = written[divmod(g, 2)], store.record(g)
        np.testing.assert_array_equal(record.crop, source["crop"])
        assert not record.flip.any()
        painted = augment.cutout(torch.zeros(BATCH, 3, SIZE, SIZE, dtype=torch.float64), record.cutout)
        for i, params in enumerate(source["second"]):
            image = Image.new("RGB", (SIZE, SIZE))
            yc, xc, hc, wc = (int(v) for v in (params[:4] * SIZE).round())
            y1, y2 = np.clip(yc - hc // 2, 0, SIZE), np.clip(yc + hc // 2, 0, SIZE)
            x1, x2 = np.clip(xc - wc // 2, 0, SIZE), np.clip(xc + wc // 2, 0, SIZE)
            ImageDraw.Draw(image).rectangle([x1, y1, x2, y2], fill=tuple(int(v) for v in params[4:]))
            ours = (painted[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(ours, np.asarray(image))


def test_less_label_directory_becomes_a_pruned_store(tmp_path, imported_images):
    recipe, workdir, _ = imported_images("imagenet1k", "relabel.mix=cutmix")
    written = write_upstream_labels(tmp_path / "fkd", torch.float16, mix=True, cutout=False, seed=7, records=3)
    with pytest.raises(UserError, match="--ratio"):
        upstream.import_labels(tmp_path / "fkd", recipe, workdir)

    store = LabelStore.open(upstream.import_labels(tmp_path / "fkd", recipe, workdir, ratio=0.25))

    assert store.path == workdir.root / "labels-r0.25" and store.ids.tolist() == [0, 1, 2]
    assert store.meta["prune"] == [{"ratio": 0.25, "pool": "random", "seed": 0}]
    for g in range(3):
        source = written[divmod(g, 2)]
        assert store.record(g).img_idx.tolist() == source["indices"]
        np.testing.assert_array_equal(store.record(g).crop, source["crop"])
        np.testing.assert_array_equal(store.record(g).logits, source["logits"].numpy())
    assert train.training_plan(store, 0)(0)[0] in (0, 1, 2)


def test_bad_label_directories_are_refused(tmp_path, imported_images):
    recipe, workdir, _ = imported_images("imagenet1k")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no epoch_<e>/batch_<b>.tar"):
        upstream.import_labels(tmp_path / "empty", recipe, workdir)
    with pytest.raises(UserError, match="does not exist"):
        upstream.import_labels(tmp_path / "nowhere", recipe, workdir)
    write_upstream_labels(tmp_path / "fkd", torch.float16, mix=True, cutout=False, seed=8)
    with pytest.raises(UserError, match="recipe has 7"):
        upstream.import_labels(tmp_path / "fkd", recipe_for("imagenet1k", "data.num_classes=7"), workdir)
    file = tmp_path / "fkd" / "epoch_1" / "batch_1.tar"
    batch = torchfiles.load_plain(file, torchfiles.numpy_int64_globals())
    torch.save([*batch[:5], torch.zeros(BATCH, CLASSES + 1)], file)
    with pytest.raises(UserError, match="epoch_1/batch_1.tar: logits are"):
        upstream.import_labels(tmp_path / "fkd", recipe, workdir, out=tmp_path / "a")
    torch.save([batch[0] * 1.01, *batch[1:]], file)
    with pytest.raises(UserError, match="not integer pixels"):
        upstream.import_labels(tmp_path / "fkd", recipe, workdir, out=tmp_path / "c")
    gap = tmp_path / "fkd" / "epoch_0" / "batch_1.tar"
    gap.unlink()
    with pytest.raises(UserError, match="records are missing: epoch_0/batch_1.tar"):
        upstream.import_labels(tmp_path / "fkd", recipe, workdir, out=tmp_path / "b")


def test_cli_and_a_recorded_order_that_differs(tmp_path, capsys):
    from lpld import cli

    write_upstream_images(tmp_path / "syn", CLASSES, IPC)
    write_upstream_labels(tmp_path / "fkd", torch.float16, mix=True, cutout=False, seed=9)
    recorded = {str(e): sum(batches, []) for e, batches in enumerate(reference_orders(CLASSES * IPC, BATCH, EPOCHS))}
    recorded["1"] = recorded["1"][::-1]
    (tmp_path / "fkd" / "sampler_indices_epoch.json").write_text(json.dumps(recorded))
    common = ["--recipe", "imagenet1k", "--workdir", str(tmp_path / "run"), "--set", f"data.resolution={SIZE}",
              "--set", "relabel.epochs=2", "--set", f"data.num_classes={CLASSES}"]
    assert cli.main(["import", "images", str(tmp_path / "syn"), *common]) == 0
    assert cli.main(["import", "labels", str(tmp_path / "fkd"), *common]) == 0
    assert "dropped 2 partial last batches" in capsys.readouterr().out

    store = LabelStore.open(tmp_path / "run" / "labels")
    assert store.meta["imported_from"]["order"]["regenerated_differs_in_epochs"] == [1]
    assert store.record(2).img_idx.tolist() == recorded["1"][:BATCH]
    assert cli.main(["import", "labels", str(tmp_path / "fkd"), *common]) == 2
    assert "already holds a label store" in capsys.readouterr().err


def test_recover_and_train_run_on_imported_artifacts(tmp_path, imported_images, one_thread):
    """The imported statistics drive `lpld recover`; the imported labels train a student."""
    for split, count in (("train", 1), ("val", 2)):
        write_upstream_images(tmp_path / "real" / split, CLASSES, count)
        for c in range(CLASSES):
            os.rename(tmp_path / "real" / split / f"new{c:03d}", tmp_path / "real" / split / f"k{c}")
    recipe, workdir, _ = imported_images(
        "imagenet1k", "relabel.mix=cutmix", f"data.root={tmp_path / 'real'}", "data.eval_resize=none",
        "data.eval_crop=none", "model.arch=resnet10", "model.stem=3x3s2", "train.epochs=1", "train.compile=false",
        "train.loader=torch", "train.workers=0", "recover.ipc=2", "recover.iterations=2")
    model = models.build_model("resnet10", CLASSES, stem="3x3s2")
    state = random_state(model, torch.Generator().manual_seed(4))
    for name, bn in models.bn_layers(model):
        state[f"{name}.class_running_mean"] = torch.zeros(CLASSES, bn.num_features)
        state[f"{name}.class_running_var"] = torch.ones(CLASSES, bn.num_features)
    torch.save({"model": state}, tmp_path / "teacher.pth")
    upstream.import_teacher(tmp_path / "teacher.pth", recipe, workdir)
    write_upstream_labels(tmp_path / "fkd", torch.float16, mix=True, cutout=False, seed=10)
    labels = upstream.import_labels(tmp_path / "fkd", recipe, workdir)

    summary = train.train(recipe, workdir, labels, "upstream", "cpu")
    assert summary and (workdir.student("upstream")).is_dir()

    fresh = WorkDir(tmp_path / "fresh")
    fresh.root.mkdir()
    for file in (workdir.teacher, workdir.stats):
        (fresh.root / file.name).write_bytes(file.read_bytes())
    recover.recover(recipe, fresh, "cpu", show_progress=False)
    assert len(bank.open(fresh.distilled, 3).images) == CLASSES * 2


def test_labels_past_1000_classes_follow_upstreams_string_sorted_listing(tmp_path):
    """1,001 classes of one 4x4 image: upstream's index u is folder sorted(names)[u], so the
    imported record must name our image of that class (our index = class id here)."""
    classes, side = 1001, 4
    recipe = get_recipe("imagenet21k", [f"data.num_classes={classes}", f"data.resolution={side}", "relabel.epochs=1"])
    names = [f"new{c:03d}" for c in range(classes)]
    for c, name in enumerate(names):
        (tmp_path / "syn" / name).mkdir(parents=True)
        Image.new("RGB", (side, side), (c % 256, c // 256, 0)).save(tmp_path / "syn" / name / f"class{c:03d}_id000.png")
    workdir = WorkDir(tmp_path / "run")
    upstream.import_images(tmp_path / "syn", recipe, workdir)
    (tmp_path / "fkd" / "epoch_0").mkdir(parents=True)
    batches = reference_orders(classes, 500, 1)[0]
    for b, indices in enumerate(batches):
        n = len(indices)
        cutout = torch.FloatTensor([[0.5, 0.5, 0.5, 0.5, 1, 2, 3]] * n)
        torch.save([torch.FloatTensor([[0, 0, 1, 1]] * n), cutout, None, None, None, torch.zeros(n, classes)],
                   tmp_path / "fkd" / "epoch_0" / f"batch_{b}.tar")

    store = LabelStore.open(upstream.import_labels(tmp_path / "fkd", recipe, workdir))

    upstream_listing = [int(name[3:]) for name in sorted(names)]
    assert upstream_listing[101] == 1000  # new1000 sorts right after new100
    for g, indices in enumerate(batches[:2]):
        assert store.record(g).img_idx.tolist() == [upstream_listing[u] for u in indices]
    distilled = bank.open(workdir.distilled, 3)
    assert distilled.images[1000, :2, 0, 0].tolist() == [1000 % 256, 1000 // 256]

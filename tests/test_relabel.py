"""Relabel: seeded records, teacher logits on exactly the replayed batch, resume, rank split, less-label runs."""
import filecmp

import numpy as np
import pytest
import torch
from torch import nn

from lpld import augment, bank, distributed, models, prune, relabel
from lpld.errors import UserError
from lpld.codecs import LogitCodec
from lpld.labels import VERIFIED, LabelStore
from lpld.recipes import get_recipe

N = 23  # with batch 5: 4 batches per epoch, 3 images of each epoch order unlabelled


def _recipe(**relabel_values):
    values = {"epochs": 3, "batch_size": 5, **relabel_values}
    return get_recipe("fmnist", [f"relabel.{k}={v}" for k, v in values.items()] + ["data.resolution=20"])


def _teacher():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 10))


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (N, 1, 28, 28), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)


def _generate(path, images, recipe=None, teacher=None, ids=None, header=None):
    recipe = recipe or _recipe()
    header = header or relabel.label_header(recipe, images, "data-fp", "teacher-fp")
    relabel.generate(teacher or _teacher(), images, path, header, ids)
    return LabelStore.open(path, expect_images=N, expect_classes=10)


def _same_store(a, b):
    names = sorted(p.name for p in a.iterdir() if p.name != VERIFIED)  # the stamp holds each copy's stat
    assert names == sorted(p.name for p in b.iterdir() if p.name != VERIFIED)
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert mismatch == [] and errors == []


def test_records_regenerate_from_the_seed(tmp_path, images):
    store = _generate(tmp_path / "s", images)
    header = store.meta
    assert len(store) == 12 and store.batches_per_epoch == 4 and "excluded" in header["partial_batches"]
    orders = []
    for epoch in range(3):
        again = relabel.epoch_records(header, epoch)
        for b, record in enumerate(again):
            stored = store.record(epoch * 4 + b)
            for name in ("img_idx", "crop", "flip", "mix_perm", "mix_box"):
                np.testing.assert_array_equal(getattr(stored, name), getattr(record, name))
            assert stored.mix_lam == record.mix_lam
        order = np.concatenate([r.img_idx for r in again])
        assert len(set(order.tolist())) == 20 and order.max() < N  # 4 disjoint batches of one permutation
        orders.append(order)
    assert not np.array_equal(orders[0], orders[1])
    assert relabel.epoch_records(dict(header, seeds={"relabel": 43}), 0)[0].crop.tolist() != store.record(0).crop.tolist()


def test_teacher_saw_the_replayed_batch_and_its_logits_are_stored(tmp_path, images):
    teacher, seen = _teacher(), []
    teacher.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    store = _generate(tmp_path / "s", images, teacher=teacher)
    meta = store.meta
    for g in range(len(store)):
        record = store.record(g)
        batch = augment.replay(images, record, meta["size"], meta["mean"], meta["std"])
        assert torch.equal(batch, seen[g])  # bit for bit: relabel and training replay are one function
        with torch.no_grad():
            reference = teacher.double()(batch.double()).float()
            teacher.float()
        torch.testing.assert_close(torch.from_numpy(record.logits).float(), reference, rtol=1e-3, atol=1e-2)


def test_cutout_recipe_stores_cutouts_and_no_mix(tmp_path, images):
    store = _generate(tmp_path / "s", images, _recipe(flip="cutout", mix="none"))
    record = store.record(5)
    assert record.cutout is not None and record.mix_perm is None and not record.flip.any()
    y1, y2, x1, x2 = record.cutout.box.T
    assert ((y2 - y1) <= 10).all() and ((x2 - x1) <= 10).all() and ((y2 - y1) >= 5).all()


@pytest.mark.parametrize("flip,mix", [("flip", "cutmix"), ("cutout", "none")])
def test_records_stacked_in_one_forward_write_the_one_record_per_forward_store(tmp_path, images, flip, mix):
    """A BatchNorm teacher in eval mode labels each stacked record as a forward of its own: 3 records
    per forward (forwards across epoch ends) and 12 (the whole run) write the store of one record per
    forward, every array bit for bit (on the CPU in float32 even the fp32 logits agree exactly)."""
    header = relabel.label_header(_recipe(flip=flip, mix=mix), images, "data-fp", "teacher-fp")
    torch.manual_seed(0)
    teacher = models.build_model("resnet10", 10, 1, "3x3s2")
    for _, bn in models.bn_layers(teacher):  # running statistics unlike any batch's own
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    relabel.generate(teacher, images, tmp_path / "r1", header)
    for stacked, forwards in ((3, 4), (12, 1)):
        sizes = []
        handle = teacher.register_forward_pre_hook(lambda module, inputs: sizes.append(len(inputs[0])))
        relabel.generate(teacher, images, tmp_path / f"r{stacked}", header, records_per_forward=stacked)
        handle.remove()
        assert sizes == [stacked * 5] * forwards
        _same_store(tmp_path / "r1", tmp_path / f"r{stacked}")


def test_the_cached_records_keep_no_logits(tmp_path, images, monkeypatch):
    """Relabel caches each epoch's records; the logits written with them must not stay attached,
    or every forward's (pinned, on CUDA) logits buffer lives as long as its epoch's cache entry."""
    drawn = []
    original = relabel.epoch_records
    monkeypatch.setattr(relabel, "epoch_records", lambda header, epoch: drawn.extend(r := original(header, epoch)) or r)
    header = relabel.label_header(_recipe(), images, "data-fp", "teacher-fp")
    relabel.generate(_teacher(), images, tmp_path / "s", header, records_per_forward=2)
    store = LabelStore.open(tmp_path / "s")
    assert len(drawn) == 12 and all(record.logits is None for record in drawn)
    assert all(np.isfinite(store.record(g).logits).all() for g in store.ids)


def test_records_per_forward_follow_the_image_target():
    assert relabel.choose_records_per_forward(relabel.IMAGES_PER_FORWARD, 32) == 8  # IN-21K
    assert relabel.choose_records_per_forward(256, 128) == 2 and relabel.choose_records_per_forward(10, 128) == 1
    with pytest.raises(UserError, match="images-per-forward"):
        relabel.choose_records_per_forward(0, 32)


# (records per forward, the forward to interrupt, forwards after the resume). Logits reach the store
# one forward late: with 1 record per forward, forward 7 (record 6) stops with epoch 0 (records 0-3)
# committed; with 3, forward 4 (records 9-11) stops after records 0-5 are written, so epoch 0 is
# committed and the resume redoes records 4-11 in 3 forwards.
@pytest.mark.parametrize("stacked,interrupt_at,resumed_forwards", [(1, 7, 8), (3, 4, 3)])
def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, images, stacked, interrupt_at,
                                                               resumed_forwards):
    _generate(tmp_path / "full", images)
    teacher, calls = _teacher(), [0]

    def interrupt(module, inputs):
        calls[0] += 1
        if calls[0] == interrupt_at:  # during the second epoch
            raise KeyboardInterrupt

    handle = teacher.register_forward_pre_hook(interrupt)
    header = relabel.label_header(_recipe(), images, "data-fp", "teacher-fp")
    with pytest.raises(KeyboardInterrupt):
        relabel.generate(teacher, images, tmp_path / "resumed", header, records_per_forward=stacked)
    with pytest.raises(UserError, match="did not finish"):
        LabelStore.open(tmp_path / "resumed")
    handle.remove()
    counted = []
    teacher.register_forward_pre_hook(lambda module, inputs: counted.append(1))
    relabel.generate(teacher, images, tmp_path / "resumed", header, records_per_forward=stacked)
    assert len(counted) == resumed_forwards  # epoch 0 was complete and is not recomputed
    _same_store(tmp_path / "full", tmp_path / "resumed")
    with pytest.raises(UserError, match="batch_size"):
        other = relabel.label_header(_recipe(batch_size=4), images, "data-fp", "teacher-fp")
        relabel.generate(teacher, images, tmp_path / "resumed", other)


@pytest.mark.parametrize("stacked", [1, 3])
def test_two_ranks_write_the_single_process_store(tmp_path, images, monkeypatch, stacked):
    _generate(tmp_path / "single", images)
    header = relabel.label_header(_recipe(), images, "data-fp", "teacher-fp")
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for rank in (1, 0):  # rank 1 writes its rows first; rank 0 writes the rest and the meta
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "is_main", lambda rank=rank: rank == 0)
        relabel.generate(_teacher(), images, tmp_path / "ranks", header, records_per_forward=stacked)
    _same_store(tmp_path / "single", tmp_path / "ranks")


@pytest.mark.parametrize("pool", ["random", "subset", "epoch"])
def test_generate_only_kept_equals_pruning_a_full_store(tmp_path, images, pool):
    recipe = _recipe(epochs=8)
    full = _generate(tmp_path / "full", images, recipe)
    pruned = prune.prune_store(full, tmp_path / "pruned", 0.75, pool, seed=3)
    header = relabel.label_header(recipe, images, "data-fp", "teacher-fp")
    kept = prune.select_pool(np.arange(32), 4, 0.75, pool, 3)
    counted = []
    teacher = _teacher()
    teacher.register_forward_pre_hook(lambda module, inputs: counted.append(1))
    relabel.generate(teacher, images, tmp_path / "kept", prune.pruned_header(header, 0.75, pool, 3), kept)
    assert len(counted) == len(kept) == 8
    _same_store(pruned, tmp_path / "kept")


def test_the_preparing_thread_is_put_on_an_indexed_gpu(monkeypatch):
    """The thread replaying the next forward's records starts on the teacher's GPU: a bare "cuda"
    (what Python callers and tests pass) becomes this rank's index, which set_device requires."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    made_current = []

    def set_device(device):  # torch.cuda.set_device's own check, without a GPU behind it
        made_current.append(torch.cuda._utils._get_device_index(device, optional=False))

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    for device in (torch.device("cuda"), "cuda", "cuda:1"):
        relabel.thread_initializer(device)()
    assert made_current == [1, 1, 1]
    assert relabel.thread_initializer("cpu") is None


def test_too_few_images_for_one_batch_is_refused(images):
    with pytest.raises(UserError, match="cannot fill one batch"):
        relabel.label_header(_recipe(batch_size=24), images, "d", "t")


def test_relabel_command_on_a_run_directory(tmp_path, images, capsys):
    from torchvision.io import write_png

    from lpld import data, models
    from lpld.workdir import WorkDir

    recipe = get_recipe("fmnist", ["relabel.epochs=2", "relabel.batch_size=5", "prune.ratio=0.5"])
    workdir = WorkDir(tmp_path / "run")
    torch.manual_seed(0)
    teacher = models.build_model(recipe.model.arch, 10, recipe.data.channels, recipe.model.stem)
    models.save_teacher(workdir.teacher, teacher, recipe)
    for i in range(12):
        folder = workdir.distilled / f"c{i % 2:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        write_png(images[i], str(folder / f"c{i % 2:05d}_i{i:04d}.png"))
    relabel.relabel(recipe, workdir, "cpu")
    assert "relabel: 4 records (20 images)" in capsys.readouterr().out
    store = LabelStore.open(workdir.labels, expect_images=12, expect_classes=10)
    assert store.meta["teacher_fingerprint"] == models.model_fingerprint(teacher)
    assert store.meta["dataset_fingerprint"] == bank.open(workdir.distilled, 1).fingerprint
    relabel.relabel(recipe, workdir, "cpu", only_kept=True)
    kept = LabelStore.open(prune.pruned_path(workdir, 0.5))
    assert kept.ids.tolist() == [0, 1] and kept.meta["prune"][0]["ratio"] == 0.5
    np.testing.assert_array_equal(kept.record(1).logits, store.record(1).logits)


TORCHRUN_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_relabel import _recipe, _teacher
from lpld import distributed, relabel
assert distributed.init()[1] == 2
images = torch.randint(0, 256, (23, 1, 28, 28), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
relabel.generate(_teacher(), images, {out!r}, relabel.label_header(_recipe(), images, "data-fp", "teacher-fp"))
"""


def test_torchrun_two_processes_write_the_single_process_store(tmp_path, images):
    import subprocess
    import sys
    from pathlib import Path

    _generate(tmp_path / "single", images)
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path / "torchrun")))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                   check=True, capture_output=True, timeout=300)
    _same_store(tmp_path / "single", tmp_path / "torchrun")


def test_teacher_with_another_class_count_is_refused(tmp_path, images):
    header = relabel.label_header(_recipe(), images, "d", "t")
    with pytest.raises(UserError, match="expected 10 classes"):
        relabel.generate(nn.Sequential(nn.Flatten(), nn.LazyLinear(7)), images, tmp_path / "s", header)


def test_topk_relabel_stores_the_top_of_the_full_logits(tmp_path, images):
    full = _generate(tmp_path / "full", images)
    header = relabel.label_header(_recipe(), images, "data-fp", "teacher-fp", LogitCodec(topk=4))
    top = _generate(tmp_path / "top", images, header=header)
    assert top.meta["topk"] == 4
    for g in (0, 5, 11):
        dense, kept = full.record(g).logits.astype(np.float64), top.record(g).logits.astype(np.float64)
        assert (np.isfinite(kept).sum(-1) == 4).all()
        np.testing.assert_array_equal(np.sort(kept, -1)[:, -4:], np.sort(dense, -1)[:, -4:])
    with pytest.raises(UserError, match="--topk 11"):
        relabel.label_header(_recipe(), images, "d", "t", LogitCodec(topk=11))

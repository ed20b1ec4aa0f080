"""train: parameter groups, schedules, gradient accumulation, compile, resume, back ends."""
import copy
import dataclasses
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.io import write_png

import lpld_kernels
from lpld import bank, models, relabel, replay
from lpld import train as training
from lpld.errors import UserError
from lpld.labels import LabelStore
from lpld.models import build_model
from lpld.recipes import get_recipe
from lpld.workdir import WorkDir

CLASSES, SIDE, IPC = 3, 16, 4


def write_folder(root, images_per_class, seed, classes=CLASSES, channels=3, side=SIDE):
    generator = torch.Generator().manual_seed(seed)
    for c in range(classes):
        (root / f"c{c:05d}").mkdir(parents=True)
        for i in range(images_per_class):
            write_png(torch.randint(0, 256, (channels, side, side), dtype=torch.uint8, generator=generator),
                      str(root / f"c{c:05d}" / f"c{c:05d}_i{i:04d}.png"))


def tiny_overrides(tmp_path, *extra):
    """Recipe overrides for a 3-class, 16 px ImageFolder under tmp_path/real and a ResNet-10 student."""
    return [
        "data.dataset=imagefolder", f"data.root={tmp_path / 'real'}", f"data.num_classes={CLASSES}",
        "data.channels=3", f"data.resolution={SIDE}", "data.mean=0.4,0.5,0.6", "data.std=0.2,0.25,0.3",
        "model.arch=resnet10", "model.stem=3x3s2", "train.epochs=2", "train.val_interval=1", "train.compile=false",
        "train.loader=torch", "train.workers=0", "train.optimizer=adamw", "train.lr=0.01",
        "relabel.epochs=2", "relabel.batch_size=4", *extra,
    ]


def tiny_run(tmp_path, *extra):
    """A work dir with distilled PNGs and relabel's store, and a recipe whose real data is a tiny ImageFolder."""
    write_folder(tmp_path / "real" / "train", 2, seed=1)
    write_folder(tmp_path / "real" / "val", 5, seed=2)
    workdir = WorkDir(tmp_path / "run")
    write_folder(workdir.distilled, IPC, seed=3)
    recipe = get_recipe("fmnist", tiny_overrides(tmp_path, *extra))
    distilled = bank.open(workdir.distilled, 3)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, CLASSES))
    header = relabel.label_header(recipe, distilled.images, distilled.fingerprint, "teacher")
    relabel.generate(teacher, distilled.images, workdir.labels, header)
    return recipe, workdir


def test_no_weight_decay_on_biases_and_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = training.parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[3].bias)}
    optimizer = training.build_optimizer(model, get_recipe("fmnist").train)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[1]["weight_decay"] == 0.0


def lrs(config, epochs):
    optimizer = training.build_optimizer(nn.Linear(2, 2), config)
    scheduler = training.build_scheduler(optimizer, config)
    values = []
    for _ in range(epochs):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_cosine_per_epoch_schedule_matches_the_formula():
    config = get_recipe("imagenet1k", ["train.epochs=7", "train.lr=0.001"]).train
    expected = [0.001 * 0.5 * (1 + math.cos(math.pi * e / 7)) for e in range(7)]
    assert lrs(config, 7) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_sgd_warmup_then_cosine_matches_torchs_sequential_schedule():
    config = get_recipe("tiny", ["train.epochs=12"]).train  # SGD 0.2, 5 warm-up epochs
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.2, momentum=0.9)
    reference = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=5),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=7, eta_min=0.0),
    ], milestones=[5])
    expected = []
    for _ in range(12):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert lrs(config, 12) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_accumulated_micro_batches_equal_one_full_batch_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 4)).double()
    images, teacher = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)

    def loss_fn(x, t):
        return lpld_kernels.soft_kl_div(model(x), t, temperature=4.0)

    def step(micro):
        copy = {k: v.clone() for k, v in model.state_dict().items()}
        model.zero_grad()
        loss = training.accumulate_gradients(loss_fn, images, teacher, micro)
        grads = [p.grad.clone() for p in model.parameters()]
        model.load_state_dict(copy)
        return loss, grads

    full_loss, full_grads = step(0)
    for micro in (3, 1):  # 3 + 3 + 2 rows, and one row at a time
        loss, grads = step(micro)
        torch.testing.assert_close(loss, full_loss, rtol=1e-12, atol=0)
        for a, b in zip(grads, full_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_compiled_training_step_equals_eager():
    torch.manual_seed(0)
    eager_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                nn.Flatten(), nn.Linear(4, 5))
    compiled_model = copy.deepcopy(eager_model)
    images, teacher = torch.randn(6, 3, 10, 10), torch.randn(6, 5).half()
    results = []
    for model, compile_flag in ((eager_model, False), (compiled_model, True)):
        config = get_recipe("fmnist", [f"train.compile={compile_flag}"]).train
        loss_fn = training.make_loss_fn(model, config, torch.device("cpu"))
        loss = training.accumulate_gradients(loss_fn, images, teacher)
        results.append((loss, [p.grad for p in model.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-7)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def weights(workdir, name):
    return torch.load(workdir.student(name) / training.CHECKPOINT, weights_only=True)["model"]


def test_resume_continues_exactly(tmp_path):
    recipe, workdir = tiny_run(tmp_path)
    store = workdir.labels
    whole = training.train(recipe, workdir, store, "whole", "cpu")
    part = training.train(recipe, workdir, store, "split", "cpu", stop_after=1)
    assert part["finished"] is False
    with pytest.raises(UserError, match="--resume"):
        training.train(recipe, workdir, store, "split", "cpu")
    with pytest.raises(UserError, match="other train"):
        training.train(recipe.with_overrides(["train.lr=0.5"]), workdir, store, "split", "cpu", resume=True)
    # a setting that cannot change the result (data-loader workers) does not block the resume
    resumed = training.train(recipe.with_overrides(["train.workers=1"]), workdir, store, "split", "cpu", resume=True)
    for key, value in weights(workdir, "whole").items():
        assert torch.equal(value, weights(workdir, "split")[key]), key
    assert resumed["top1"] == whole["top1"] and resumed["top5"] == whole["top5"]
    lines = [json.loads(line) for line in (workdir.student("split") / training.METRICS).read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1] and all("top1" in line for line in lines)
    summary = json.loads((workdir.student("whole") / training.SUMMARY).read_text())
    assert summary["records"] == 2 * 3 and summary["compression_factor"] == 1.0 and 0 <= summary["top1"] <= 100
    assert (workdir.student("whole") / "student.safetensors").is_file()
    assert training.train(recipe, workdir, store, "whole", "cpu", resume=True) == whole  # finished: nothing to do
    training.train(recipe, workdir, store, "broken", "cpu", stop_after=1)
    (workdir.student("broken") / training.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable lpld checkpoint"):
        training.train(recipe, workdir, store, "broken", "cpu", resume=True)
    with pytest.raises(UserError, match="val_interval"):
        training.train(recipe.with_overrides(["train.val_interval=0"]), workdir, store, "zero", "cpu")


@pytest.mark.dali
def test_dali_replay_trains_like_torch_replay(tmp_path):
    # SGD: the update is linear in the gradient, so the loaders' ~1e-6 pixel differences stay small
    # (AdamW divides by sqrt(v) and magnifies them for parameters with tiny gradients).
    recipe, workdir = tiny_run(tmp_path, "train.epochs=1", "train.optimizer=sgd")
    results = {kind: training.train(recipe, workdir, workdir.labels, kind, "cpu", loader=kind) for kind in ("torch", "dali")}
    for key, value in weights(workdir, "torch").items():
        if value.is_floating_point():
            torch.testing.assert_close(weights(workdir, "dali")[key], value, rtol=1e-4, atol=1e-6)
    assert results["dali"]["top1"] == results["torch"]["top1"]


def _torchrun_train(tmp_path, workdir, name, extra, *flags):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lpld",
               "train", "--workdir", str(workdir.root), "--labels", str(workdir.labels), "--name", name,
               "--device", "cpu", *flags,
               *[item for override in tiny_overrides(tmp_path, *extra) for item in ("--set", override)]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _one_process_reference(recipe, workdir, records_per_step, lr_factor=1):
    """One process stepping once per ``records_per_step`` consecutive records of epoch 0's plan."""
    store = LabelStore.open(workdir.labels)
    dataset = replay.RecordDataset(store, bank.open(workdir.distilled, 3).images, SIDE, store.meta["mean"],
                                   store.meta["std"])
    torch.manual_seed(recipe.train.seed)
    model = build_model("resnet10", CLASSES, 3, "3x3s2")
    model = models.use_ghost_batch_norm(model, recipe.train.bn_batch).train()
    optimizer = training.build_optimizer(model, dataclasses.replace(recipe.train, lr=recipe.train.lr * lr_factor))
    loss_fn = training.make_loss_fn(model, recipe.train, torch.device("cpu"))
    plan = training.training_plan(store, recipe.train.seed, recipe.train.full_plan)(0)
    steps = 0
    for first in range(0, len(plan), records_per_step):
        group = [dataset[g] for g in plan[first:first + records_per_step]]
        optimizer.zero_grad()
        training.accumulate_gradients(loss_fn, torch.cat([b.images for b in group]), torch.cat([b.logits for b in group]),
                                      micro_batch=store.meta["batch_size"])
        optimizer.step()
        steps += 1
    return model, steps


# Both torchrun tests train with SGD, because AdamW turns float-order noise in near-zero gradients
# into lr-sized steps (as in the DALI test above). float32's KL gradient at T = 20 is good to ~1e-6
# relative (closed form and autograd alike, against float64), and three steps through BatchNorm on
# 2-row groups magnify the order noise to ~4e-6: hence atol 1e-5.
def test_torchrun_ranks_split_each_records_rows_like_one_process_with_ghost_batch_norm(tmp_path):
    """The default (split rows, upstream's DataParallel semantics): 2 gloo ranks replay every record and
    take rows 0-2 and 3-4 of its 5, one step per record, each rank's loss weighted by its share (6/5
    and 4/5). One process with train.bn_batch = 3 takes the same steps: parameters and BN running
    statistics (rank 0's = the first group's) agree, and so does the step count."""
    extra = ["train.epochs=1", "train.optimizer=sgd", "relabel.batch_size=5"]
    recipe, workdir = tiny_run(tmp_path, *extra)
    _torchrun_train(tmp_path, workdir, "ddp", extra)
    reference, steps = _one_process_reference(recipe.with_overrides(["train.bn_batch=3"]), workdir, 1)
    store = LabelStore.open(workdir.labels)
    logged = [json.loads(line) for line in (workdir.student("ddp") / training.METRICS).read_text().splitlines()]
    assert logged[0]["steps"] == steps == store.batches_per_epoch
    trained = weights(workdir, "ddp")
    for name, value in reference.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(trained[name], value.detach(), rtol=1e-4, atol=1e-5)


def test_torchrun_split_records_takes_two_records_per_step_at_twice_the_lr(tmp_path):
    """The opt-in throughput mode: rank r replays records r, r + 2, ... and DDP averages, which equals
    one process accumulating each pair at twice the lr (linear scaling) with per-record BatchNorm
    (buffers differ: DDP keeps rank 0's running statistics)."""
    extra = ["train.epochs=1", "relabel.batch_size=2", "train.optimizer=sgd"]
    recipe, workdir = tiny_run(tmp_path, *extra)
    done = _torchrun_train(tmp_path, workdir, "ddp", extra, "--split", "records")
    assert "departs from the paper" in done.stderr
    reference, steps = _one_process_reference(recipe, workdir, 2, lr_factor=2)
    logged = json.loads((workdir.student("ddp") / training.METRICS).read_text().splitlines()[0])
    assert logged["steps"] == steps
    trained = weights(workdir, "ddp")
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(trained[name], parameter.detach(), rtol=1e-4, atol=1e-5)



def test_precision_and_teacher_scale_reach_the_loss():
    """fp32 by default (no autocast), bf16 only when asked; the teacher scale multiplies the stored
    logits before the temperature (IN-21K: 0.8, i.e. a teacher temperature of 25 against 20)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    images, stored = torch.randn(4, 3, 2, 2), (3 * torch.randn(4, 5)).half()
    seen = []
    model.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    config = get_recipe("imagenet21k", ["train.compile=false"]).train
    loss = training.make_loss_fn(model, config, torch.device("cpu"))(images, stored)
    expected = lpld_kernels.soft_kl_div(model(images), stored.float() * 0.8, temperature=20.0)
    assert seen[0] == torch.float32
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, lpld_kernels.soft_kl_div(model(images), stored, temperature=20.0))
    bf16 = training.make_loss_fn(model, get_recipe("fmnist", ["train.bf16=true"]).train, torch.device("cpu"))
    seen.clear()
    bf16(images, stored)
    assert seen == [torch.bfloat16]


def test_full_labels_plan_is_sampled_with_replacement_or_stored_in_order(tmp_path):
    recipe, workdir = tiny_run(tmp_path)
    store = LabelStore.open(workdir.labels)
    nb = store.batches_per_epoch
    stored = training.training_plan(store, 0, "stored")
    assert [stored(e) for e in range(2)] == [list(range(e * nb, (e + 1) * nb)) for e in range(2)]
    sampled = training.training_plan(store, 0, "sampled")
    draws = [g for e in range(20) for g in sampled(e)]
    assert all(len(sampled(e)) == nb for e in range(3)) and set(draws) <= set(store.ids.tolist())
    assert len(set(draws)) > nb and sampled(3) == sampled(3) and sampled(3) != sampled(4)
    assert any(len(set(sampled(e))) < nb for e in range(20))  # with replacement: repeats within an epoch
    with pytest.raises(UserError, match="full_plan"):
        training.training_plan(store, 0, "shuffled")


def test_row_split_refuses_ranks_that_would_get_no_rows():
    """ceil(B / W) rows per rank: 32 rows over 8 ranks is 4 each, over 9 ranks the last gets none."""
    assert [training.rank_rows(5, rank, 2) for rank in range(2)] == [slice(0, 3), slice(3, 5)]
    config = get_recipe("imagenet21k").train
    training._check_batching(config, 32, 8)
    with pytest.raises(UserError, match="without rows"):
        training._check_batching(config, 32, 9)
    training._check_batching(get_recipe("imagenet21k", ["train.split=records"]).train, 32, 9)


@pytest.mark.parametrize("override, message", [
    ("train.split=halves", "train.split"), ("train.bn_batch=-1", "bn_batch"),
    ("train.micro_batch=3", "multiple of train.bn_batch"),
])
def test_bad_batching_settings_are_user_errors(tmp_path, override, message):
    recipe, workdir = tiny_run(tmp_path, "train.bn_batch=2", override)
    with pytest.raises(UserError, match=message):
        training.train(recipe, workdir, workdir.labels, "bad", "cpu")


def test_progress_bar_shows_the_logged_loss_with_significant_digits(tmp_path, capfd):
    # T = 20 makes the batchmean KL tiny; the bar must still show it, to 4 significant digits
    recipe, workdir = tiny_run(tmp_path, "train.temperature=20")
    training.train(recipe, workdir, workdir.labels, "bar", "cpu")
    shown = [float(value) for value in re.findall(r"loss=([-+0-9.e]+)", capfd.readouterr().err)]
    logged = [json.loads(line)["loss"] for line in (workdir.student("bar") / training.METRICS).read_text().splitlines()]
    assert logged and all(value > 0 for value in logged)
    assert shown and shown[-1] == pytest.approx(logged[-1], rel=1e-3)

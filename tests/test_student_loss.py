"""LPQLD's training against its formulas written out: the teacher temperature schedules (Dynamic
Knowledge Reuse), the student temperature's calibration grid, the lpqld preset's numbers, and a
training run that follows them, resumes them, and leaves LPLD's default untouched."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import lpld_kernels
from lpld import student_loss
from lpld import train as training
from lpld.errors import UserError
from lpld.recipes import LPQLD_TRAINING, get_recipe

from test_train import tiny_overrides, tiny_run, weights


def _config(*overrides, epochs=300):
    return get_recipe("imagenet1k", [f"train.epochs={epochs}", *overrides]).train


def test_step_schedule_is_lpqld_main_table():
    """T0 = 20, every 30 epochs x 0.7, floor 2, epochs counted from 1: 20 for epochs 1-29 (ours 0-28),
    then 14, 9.8, 6.86, 4.802, 3.3614, 2.35298, and 2 from epoch 210 (20 * 0.7^7 = 1.647 is floored)."""
    config = get_recipe("imagenet1k", preset="lpqld").train
    expected = {0: 20, 28: 20, 29: 14, 59: 9.8, 89: 6.86, 119: 4.802, 149: 3.3614, 179: 2.35298, 208: 2.35298,
                209: 2.0, 299: 2.0}
    for epoch, value in expected.items():
        assert student_loss.teacher_temperature(config, epoch) == pytest.approx(value, rel=1e-12), epoch


def test_the_other_schedules_follow_their_formulas():
    t0, low, total = 20.0, 1.5, 300
    cosine = _config("train.temperature_schedule=cosine", "train.temperature_min=1.5")
    reverse = _config("train.temperature_schedule=cosine_reverse", "train.temperature_min=1.5")
    step_reverse = _config("train.temperature_schedule=step_reverse", "train.temperature_gamma=0.7")
    for epoch in (0, 1, 149, 298, 299):
        e = epoch + 1
        assert student_loss.teacher_temperature(cosine, epoch) == pytest.approx(
            low + 0.5 * (t0 - low) * (1 + math.cos(math.pi * e / total)))
        assert student_loss.teacher_temperature(reverse, epoch) == pytest.approx(
            low + 0.5 * (t0 - low) * (1 - math.cos(math.pi * e / total)))
        assert student_loss.teacher_temperature(step_reverse, epoch) == pytest.approx(
            t0 * 0.7 ** ((total - min(e, total - 1) - 1) // 30))
    assert student_loss.teacher_temperature(step_reverse, 0) == pytest.approx(20 * 0.7**9)  # no floor, as LPQLD's
    assert student_loss.teacher_temperature(cosine, 299) == pytest.approx(low)
    assert student_loss.teacher_temperature(_config(), 123) == 20.0  # LPLD: constant
    with pytest.raises(UserError, match="temperature_schedule"):
        student_loss.Temperatures(_config("train.temperature_schedule=linear"))


def test_calibration_picks_the_grid_value_with_the_least_kl():
    """The grid 0.01 .. 1.00 and the argmin of batchmean KL(softmax(z_t / T) || softmax(z_s / t)),
    computed here one t at a time in float64."""
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 10, generator=generator) * 3, torch.randn(16, 10, generator=generator) * 30
    grid = np.linspace(0.01, 1, 100)
    assert student_loss.CALIBRATION_GRID == pytest.approx(tuple(grid), abs=1e-12)
    p_t = torch.softmax(teacher.double() / 20.0, 1)
    expected = [float((p_t * (p_t.log() - torch.log_softmax(student.double() / t, 1))).sum()) for t in grid]
    measured = student_loss.calibration_losses(student, teacher, 20.0)
    np.testing.assert_allclose(measured.double().numpy(), expected, rtol=1e-4)
    temperatures = student_loss.Temperatures(get_recipe("imagenet1k", preset="lpqld").train)
    assert temperatures.of_epoch(0) == (20.0, 1.0)  # the calibrated student starts at 1.0
    temperatures.calibrate(student, teacher, 0)
    assert temperatures.student == pytest.approx(grid[int(np.argmin(expected))])
    assert temperatures.of_epoch(1) == (20.0, temperatures.student)


def test_presets_pin_lpqld_settings_and_leave_lpld_alone():
    lpld = get_recipe("imagenet1k")
    assert (lpld.train.temperature_schedule, lpld.train.student_temperature, lpld.train.calibrate_student) == \
        ("constant", 0.0, False)
    assert (lpld.prune.ratio, lpld.prune.topk) == (0.975, 0)
    in1k, in21k = get_recipe("imagenet1k", preset="lpqld"), get_recipe("imagenet21k", preset="lpqld")
    for recipe in (in1k, in21k):
        train = recipe.train
        assert (train.temperature, train.temperature_schedule, train.temperature_step, train.temperature_gamma,
                train.temperature_floor, train.student_temperature, train.calibrate_student) == \
            (20.0, "step", 30, 0.7, 2.0, 1.0, True)
    assert (in1k.prune.ratio, in1k.prune.topk) == (0.9, 100)
    assert (in21k.prune.ratio, in21k.prune.topk, in21k.train.teacher_logit_scale) == (0.975, 2000, 0.8)
    assert get_recipe("imagenet1k", ["train.temperature_gamma=0.5"], preset="lpqld").train.temperature_gamma == 0.5
    assert all(item.startswith("train.") for item in LPQLD_TRAINING)
    with pytest.raises(UserError, match="unknown preset"):
        get_recipe("fmnist", preset="lpqld2")


def test_the_loss_uses_the_epochs_temperatures():
    """LPLD's default is the one-temperature KL; a student temperature and a teacher temperature each
    reach the math."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    images, stored = torch.randn(4, 3, 2, 2), (torch.randn(4, 5) * 4).half()
    config = get_recipe("fmnist", ["train.compile=false"]).train
    loss_fn = training.make_loss_fn(model, config, torch.device("cpu"))
    plain = loss_fn(images, stored)
    assert torch.equal(plain, lpld_kernels.soft_kl_div(model(images), stored, temperature=20.0))
    assert torch.equal(loss_fn(images, stored, (20.0, 20.0)), plain)
    calibrated = loss_fn(images, stored, (20.0, 0.5))
    assert torch.equal(calibrated, lpld_kernels.soft_kl_div(model(images), stored, 20.0, student_temperature=0.5))
    assert not torch.equal(calibrated, plain) and not torch.equal(loss_fn(images, stored, (14.0, 14.0)), plain)


def test_lpqld_training_follows_the_schedule_calibrates_and_resumes(tmp_path):
    _, workdir = tiny_run(tmp_path)
    recipe = get_recipe("fmnist", tiny_overrides(tmp_path, "train.epochs=3", "train.val_interval=3",
                                                 "train.temperature_step=1", "train.temperature_gamma=0.5",
                                                 "train.temperature_floor=6"), preset="lpqld")
    whole = training.train(recipe, workdir, workdir.labels, "lpqld", "cpu")
    lines = [json.loads(line) for line in (workdir.student("lpqld") / training.METRICS).read_text().splitlines()]
    assert [line["teacher_temperature"] for line in lines] == [10.0, 6.0, 6.0]  # 20 * 0.5^e, floored at 6
    students = [line["student_temperature"] for line in lines]
    assert students[0] == 1.0 and all(t in student_loss.CALIBRATION_GRID for t in students)
    training.train(recipe, workdir, workdir.labels, "split", "cpu", stop_after=2)
    resumed = training.train(recipe, workdir, workdir.labels, "split", "cpu", resume=True)
    split = [json.loads(line) for line in (workdir.student("split") / training.METRICS).read_text().splitlines()]
    assert [line["student_temperature"] for line in split] == students  # the calibrated value survived the stop
    for key, value in weights(workdir, "lpqld").items():
        assert torch.equal(value, weights(workdir, "split")[key]), key
    assert resumed["top1"] == whole["top1"]


def test_checkpoints_from_before_lpqlds_fields_keep_their_identity():
    """At their defaults the new train fields stay out of a student's identity, so a checkpoint written
    by lpld before them still resumes; set, they are part of it."""
    class Store:
        fingerprint = "labels"

    plain = json.loads(training._student_identity(get_recipe("fmnist"), Store(), 1)["train"])
    assert not set(training.LPQLD_FIELDS) & set(plain) and plain["temperature"] == 20.0
    lpqld = json.loads(training._student_identity(get_recipe("fmnist", preset="lpqld"), Store(), 1)["train"])
    assert {"temperature_schedule", "student_temperature", "calibrate_student"} <= set(lpqld)
    with pytest.raises(UserError, match="temperature_min"):
        student_loss.Temperatures(_config("train.temperature_schedule=cosine", "train.temperature_min=0"))

"""The student's loss: soft-label KL at LPLD's one fixed T, or LPQLD's teacher schedule and calibrated student.

``make_loss_fn`` is what a training step calls (student forward, stored logits, the fused KL at the
epoch's temperatures) and ``accumulate_gradients`` runs it over micro-batches; ``Temperatures``
says which temperatures each epoch uses.

LPQLD (TPAMI'26) trains on the same stored logits with two changes to the loss, both read from its
``train_FKD_LPQLD.py`` and its reproduce scripts:

- Dynamic Knowledge Reuse (``train.temperature_schedule``): the teacher temperature is a function of
  the epoch e, counted from 1 as LPQLD counts it, so the same records give softer targets early and
  sharper ones late. With T0 = ``train.temperature``, E epochs:
  ``step``  T0 * gamma^(e // step), never below ``temperature_floor`` (LPQLD: 20, 30, 0.7, floor 2,
  so 20 for epochs 1-29, 14 for 30-59, ..., 2 from epoch 210);
  ``cosine``  Tmin + (T0 - Tmin)(1 + cos(pi e / E)) / 2;
  ``step_reverse``  T0 * gamma^((E - min(e, E - 1) - 1) // step), rising to T0, no floor;
  ``cosine_reverse``  Tmin + (T0 - Tmin)(1 - cos(pi e / E)) / 2; ``constant``  T0 (LPLD).
- Calibrated student-teacher alignment: the student's logits are softened by their own temperature
  (``train.student_temperature``; 0 means the teacher's, as LPLD), and with
  ``train.calibrate_student`` it is re-fit after every epoch: the value of the grid 0.01, 0.02, ...,
  1.00 (absolute values, as LPQLD's code has them) whose KL to the teacher is least on the
  epoch's last batch becomes the next epoch's (the first epoch uses ``student_temperature``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import lpld_kernels

from . import distributed
from .errors import UserError
from .recipes import TrainConfig

SCHEDULES = ("constant", "step", "cosine", "step_reverse", "cosine_reverse")
CALIBRATION_GRID = tuple(round(0.01 * i, 2) for i in range(1, 101))  # LPQLD's np.linspace(0.01, 1, 100)


def make_loss_fn(model: nn.Module, config: TrainConfig, device: torch.device, keep_last: bool = False) -> Callable:
    """(images, stored fp16 logits, (teacher T, student T)) -> soft-label KL of the student.

    The student's forward is the one place torch.compile applies; the fused KL takes the epoch's
    temperatures as plain numbers (None: the recipe's fixed ones), so a schedule never recompiles.
    fp32 unless ``train.bf16`` (the paper's runs are fp32; at T = 20 the gradient lives in small
    logit differences). ``train.teacher_logit_scale`` multiplies the stored logits before the
    temperature (upstream's IN-21K label smoothing on logits), which stay raw on disk. With
    ``keep_last`` the call leaves its (student, teacher) logits in ``loss_fn.last`` (the calibration
    of LPQLD's student temperature reads the epoch's last batch).
    """
    scale = config.teacher_logit_scale
    forward = torch.compile(model) if config.compile else model
    last: list = []

    def loss_fn(images: torch.Tensor, teacher_logits: torch.Tensor, temperatures=None) -> torch.Tensor:
        teacher_t, student_t = temperatures or (config.temperature, config.student_temperature or config.temperature)
        with torch.autocast(device.type, torch.bfloat16, enabled=config.bf16):
            student_logits = forward(images)
        if scale != 1:
            teacher_logits = teacher_logits.float() * scale
        if keep_last:
            last[:] = [student_logits.detach(), teacher_logits]
        return lpld_kernels.soft_kl_div(student_logits, teacher_logits, teacher_t, config.t2_scale,
                                        student_temperature=student_t)

    loss_fn.last = last
    return loss_fn


def accumulate_gradients(loss_fn: Callable, images: torch.Tensor, teacher_logits: torch.Tensor,
                         micro_batch: int = 0, no_sync: Callable = contextlib.nullcontext,
                         weight: float = 1.0) -> torch.Tensor:
    """Backward over micro-batches of ``micro_batch`` rows (0: the whole record); returns the record's loss.

    Each part's batchmean loss is weighted by its share of the record, so the summed gradient is
    the whole record's gradient (exactly so for models without batch statistics; BatchNorm sees
    smaller batches). ``no_sync`` (DDP) skips the gradient all-reduce for all but the last part;
    ``weight`` scales the whole (a rank's share of a record split across ranks).
    """
    total = len(images)
    size = micro_batch if 0 < micro_batch < total else total
    loss_sum = 0.0
    for start in range(0, total, size):
        part = slice(start, start + size)
        rows = len(images[part])
        with no_sync() if start + size < total else contextlib.nullcontext():
            loss = loss_fn(images[part], teacher_logits[part]) * (weight * rows / total)
            loss.backward()
        loss_sum = loss_sum + loss.detach()
    return loss_sum


def check(config: TrainConfig) -> None:
    if config.temperature_schedule not in SCHEDULES:
        raise UserError(f"train.temperature_schedule={config.temperature_schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if config.temperature <= 0 or config.student_temperature < 0:
        raise UserError(f"train.temperature={config.temperature} and train.student_temperature="
                        f"{config.student_temperature}: temperatures are positive (student 0: the teacher's)")
    if config.temperature_schedule.startswith("cosine") and config.temperature_min <= 0:
        raise UserError(f"train.temperature_min={config.temperature_min}: the cosine schedules reach it, so it must be "
                        "positive")
    if config.temperature_schedule.startswith("step") and (config.temperature_step < 1 or config.temperature_gamma <= 0):
        raise UserError(f"train.temperature_step={config.temperature_step}, temperature_gamma={config.temperature_gamma}: "
                        "the step schedules need a step of at least 1 epoch and a positive gamma")


def teacher_temperature(config: TrainConfig, epoch: int) -> float:
    """The teacher temperature of ``epoch`` (0-based, as lpld counts; the schedules count from 1)."""
    t0, total, e = config.temperature, config.epochs, epoch + 1
    kind = config.temperature_schedule
    if kind == "step":
        return max(t0 * config.temperature_gamma ** (e // config.temperature_step), config.temperature_floor)
    if kind == "step_reverse":
        return t0 * config.temperature_gamma ** ((total - min(e, total - 1) - 1) // config.temperature_step)
    if kind in ("cosine", "cosine_reverse"):
        low, turn = config.temperature_min, math.cos(math.pi * e / total)
        return low + 0.5 * (t0 - low) * (1 + turn if kind == "cosine" else 1 - turn)
    return t0


def calibration_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Summed (not yet averaged) KL(softmax(z_t / T) || softmax(z_s / t)) for every t of the grid, [len grid]."""
    grid = torch.tensor(CALIBRATION_GRID, dtype=torch.float32, device=student_logits.device)
    p_t = torch.softmax(teacher_logits.float() / temperature, dim=1)
    log_p_t = torch.where(p_t > 0, p_t.log(), 0.0)
    losses = []
    for chunk in grid.split(10):  # [10, B, K] at a time: IN-21K records would need GBs for the whole grid
        log_p_s = F.log_softmax(student_logits.float()[None] / chunk[:, None, None], dim=2)
        losses.append((p_t[None] * (log_p_t[None] - log_p_s)).sum(dim=(1, 2)))
    return torch.cat(losses)


class Temperatures:
    """The (teacher, student) temperatures epoch by epoch, and the calibrated student's state."""

    def __init__(self, config: TrainConfig):
        check(config)
        self.config = config
        self.student = config.student_temperature or None  # None: the teacher's
        if config.calibrate_student and self.student is None:
            self.student = 1.0  # LPQLD's scripts start the calibrated student at 1.0

    def of_epoch(self, epoch: int) -> tuple[float, float]:
        teacher = teacher_temperature(self.config, epoch)
        return teacher, self.student or teacher

    def calibrate(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, epoch: int) -> None:
        """After ``epoch``: the grid's best student temperature on its last batch (every rank's rows of it)."""
        if not self.config.calibrate_student:
            return
        teacher = teacher_temperature(self.config, epoch)
        losses = distributed.all_reduce_sum(calibration_losses(student_logits, teacher_logits, teacher))
        self.student = CALIBRATION_GRID[int(torch.argmin(losses))]  # ties: the smallest, as numpy's argmin

    def state_dict(self) -> dict:
        return {"student": self.student}

    def load_state_dict(self, state: dict) -> None:
        self.student = state["student"]

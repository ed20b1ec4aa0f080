"""Train a student from scratch on the distilled images and a (pruned) label store (SPEC.md section 6).

One batch, followed by name: ``PlanSampler`` picks record g (``lpld.prune.plan``) -> ``replay``
rebuilds relabel's batch (DALI or torch) -> the student -> ``lpld_kernels.soft_kl_div`` against the
stored fp16 logits, temperature T (or LPQLD's per-epoch teacher and calibrated student temperatures,
``lpld.student_loss``), batchmean, times T^2 when the recipe says so, no hard-label term. AdamW or
SGD with no weight decay on biases and BN (1-D) parameters; a per-epoch schedule:
optional linear warm-up from 0.01, then cosine to 0. A checkpoint (model, optimizer, scheduler,
sampler epoch, RNG) is written atomically after every epoch and ``--resume`` continues from it
exactly. Under torchrun (``train.split rows``, the default) every rank replays the same record
and trains on its ceil(B / W) rows, DDP averaging the gradients: one optimizer step per record with
the global batch B, as upstream's DataParallel ran, each rank's BatchNorm seeing its rows.
``train.bn_batch`` gives one process the same BatchNorm groups (ghost BatchNorm).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from . import distributed, identity, replay
from .atomic import write_atomically
from .errors import UserError
from .recipes import Recipe, TrainConfig, add_recipe_arguments, recipe_from_args
from .student_loss import SCHEDULES, Temperatures, accumulate_gradients, make_loss_fn
from .workdir import WorkDir

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
EVAL_BATCH = 256


def format_loss(loss: float) -> str:
    """Four significant digits: at T = 20 the batchmean KL is ~1e-4 and a fixed ``.4f`` shows 0.0000."""
    return f"{loss:.4g}"


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only conv/linear weights (name has "weight" and ndim > 1); biases and BN get 0, as upstream."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim > 1 and "weight" in name else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    raise UserError(f"train.optimizer={config.optimizer!r}: choose adamw or sgd")


def lr_factor(epoch: int, epochs: int, warmup_epochs: int) -> float:
    """Linear warm-up from 0.01 over ``warmup_epochs``, then cosine from 1 to 0 over the rest."""
    if epoch < warmup_epochs:
        return 0.01 + 0.99 * epoch / warmup_epochs
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per epoch (SPEC.md sections 6 and 11.6: never per batch)."""
    if not 0 <= config.warmup_epochs < config.epochs:
        raise UserError(f"train.warmup_epochs={config.warmup_epochs} must be in [0, train.epochs={config.epochs})")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: lr_factor(epoch, config.epochs, config.warmup_epochs))


FULL_PLANS = {"sampled": "random", "stored": "order"}
# LPQLD's training fields: left out of a checkpoint's identity at their defaults, so students trained
# before they existed (one fixed temperature) still resume
LPQLD_FIELDS = ("temperature_schedule", "temperature_step", "temperature_gamma", "temperature_floor", "temperature_min",
                "student_temperature", "calibrate_student")


def training_plan(store, seed: int, full_plan: str = "sampled") -> Callable[[int], list[int]]:
    """epoch -> record ids. A pruned store follows its pool (the paper's: nb draws with replacement
    per epoch). Full labels: ``sampled`` draws nb records with replacement from all of them, which
    is what upstream's r = 0 scripts ran (their "0" == "0.0" test never matched, so the
    order/epoch branch never did); ``stored`` replays stored epoch e in order (SPEC.md 10.8)."""
    from . import prune

    if full_plan not in FULL_PLANS:
        raise UserError(f"train.full_plan={full_plan!r}: choose one of {', '.join(FULL_PLANS)}")
    history = store.meta.get("prune", [])
    kind = history[-1]["pool"] if history else FULL_PLANS[full_plan]
    return functools.partial(prune.plan, seed=seed, pool=store.ids,
                             batches_per_epoch=store.batches_per_epoch, kind=kind)


def rank_rows(batch_size: int, rank: int, world: int) -> slice:
    """This rank's rows of a record under ``split rows``: consecutive chunks of ceil(B / W) rows,
    the way DataParallel scattered upstream's batches (start and stop clamped to B, so
    stop - start is the rank's row count, 0 past the end)."""
    chunk = -(-batch_size // world)
    return slice(min(rank * chunk, batch_size), min((rank + 1) * chunk, batch_size))


def _train_epoch(batches, loss_fn: Callable, optimizer, micro_batch: int, no_sync: Callable, device: torch.device,
                 memory_format: torch.memory_format, on_step: Callable, rows: slice | None) -> tuple[float, int]:
    """One pass over the sampler's records, one optimizer step per record; (mean loss over ranks, steps).

    ``rows``: this rank's rows of every record (split rows), or None for whole records. The rank's
    loss is weighted by its share times W, so DDP's average over ranks is the record's batchmean.
    """
    loss_sum, steps = torch.zeros((), device=device), 0
    world = distributed.world_size()
    for batch in batches:
        images, logits = batch.images, batch.logits
        weight = 1.0
        if rows is not None:
            weight = (rows.stop - rows.start) * world / len(images)
            images, logits = images[rows], logits[rows]
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        optimizer.zero_grad(set_to_none=True)
        loss_sum += accumulate_gradients(loss_fn, images, logits.to(device, non_blocking=True), micro_batch, no_sync,
                                         weight)
        optimizer.step()
        steps += 1
        on_step()
    mean = distributed.all_reduce_sum(loss_sum / max(steps, 1)) / world
    return mean.item(), steps


def _check_batching(config: TrainConfig, record_size: int, world: int) -> None:
    """The split, ghost-BN and micro-batch settings must fit the records and the ranks."""
    if config.split not in ("rows", "records"):
        raise UserError(f"train.split={config.split!r}: choose rows (the paper's semantics) or records")
    if config.bn_batch < 0:
        raise UserError(f"train.bn_batch={config.bn_batch}: use 0 (the whole record) or a row count")
    last = rank_rows(record_size, world - 1, world)
    if config.split == "rows" and world > 1 and last.stop == last.start:
        raise UserError(f"records of {record_size} rows in chunks of ceil({record_size}/{world}) leave the last of {world} "
                        "ranks without rows; use fewer ranks or --split records")
    if config.bn_batch and config.micro_batch and config.micro_batch % config.bn_batch:
        raise UserError(f"train.micro_batch={config.micro_batch} must be a multiple of train.bn_batch={config.bn_batch}, "
                        "so that micro-batching keeps the BatchNorm groups")
    first_rank_rows = rank_rows(record_size, 0, world).stop
    if config.bn_batch and world > 1 and config.split == "rows" and first_rank_rows < config.bn_batch and \
            distributed.is_main():
        warnings.warn(f"each of {world} ranks normalizes at most {first_rank_rows} rows, fewer than train.bn_batch="
                      f"{config.bn_batch}: BatchNorm statistics come from smaller groups than the recipe's", stacklevel=3)


def _check_store_fits(store, distilled, recipe: Recipe) -> None:
    meta = store.meta
    if meta.get("dataset_fingerprint") not in (None, distilled.fingerprint):
        raise UserError(f"{store.path} was made from other distilled images than {distilled.fingerprint}; "
                        "relabel these images (lpld relabel) or use the matching --workdir")
    same_view = (meta["size"] == recipe.data.resolution and list(meta["mean"]) == list(recipe.data.mean)
                 and list(meta["std"]) == list(recipe.data.std))
    if not same_view:
        raise UserError(f"{store.path} was made at size {meta['size']}, mean {meta['mean']}, std {meta['std']}, "
                        f"but the recipe evaluates at {recipe.data.resolution}, {list(recipe.data.mean)}, "
                        f"{list(recipe.data.std)}; use the recipe the labels were made with")


def _student_identity(recipe: Recipe, store, world: int) -> dict:
    """What a checkpoint must share with the run resuming it: the student's recipe, labels and world size.

    Other stages' settings reach the student only through the labels, whose fingerprint is here.
    """
    data = recipe.settings("data")["data"]
    defaults = TrainConfig()
    results_settings = {key: value for key, value in dataclasses.asdict(recipe.train).items()
                        if key not in ("workers", "loader", "compile", "val_interval")
                        and not (key in LPQLD_FIELDS and value == getattr(defaults, key))}
    return identity.of(train=json.dumps(results_settings, sort_keys=True),
                       student=json.dumps({"data": data, "stem": recipe.model.stem,
                                           "arch": recipe.train.arch or recipe.model.arch}, sort_keys=True),
                       labels=store.fingerprint, world_size=world)


def _restore(path: Path, model, optimizer, scheduler, sampler, made_by: dict, temperatures: Temperatures) -> int:
    """Load a checkpoint written by this recipe on these labels; returns the next epoch to run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, foreign or not a checkpoint at all
        raise UserError(f"{path} is not a readable lpld checkpoint ({type(error).__name__}); "
                        "delete that student folder or train under another --name") from None
    if not isinstance(state, dict) or "identity" not in state:
        raise UserError(f"{path} is not an lpld student checkpoint; delete it or train under another --name")
    identity.check(state["identity"], made_by, path, "train under another --name, or delete that student folder")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    if "temperatures" in state:  # checkpoints before LPQLD's training had one fixed temperature
        temperatures.load_state_dict(state["temperatures"])
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng_cuda"])
    return int(state["epoch"])


def _trim_metrics(path: Path, first_epoch: int) -> None:
    """Drop log lines of epochs that the checkpoint does not hold (a crash between log and save)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] < first_epoch]
        path.write_text("".join(f"{line}\n" for line in lines))


def train(recipe: Recipe, workdir: WorkDir, labels_path: str | Path, name: str, device: torch.device | str | None = None,
          resume: bool = False, loader: str | None = None, stop_after: int | None = None) -> dict:
    """``lpld train``: train student ``name`` into workdir/students/NAME; returns its summary.

    ``resume`` continues from the checkpoint (and returns the summary of a finished run);
    ``stop_after`` trains at most that many epochs in this call (time-boxed jobs; resume later).
    """
    from . import bank, evaluate, labels, models

    wall_start = time.perf_counter()
    rank, world = distributed.init(device)
    device = distributed.device(device)
    config = recipe.train
    if config.val_interval < 1:
        raise UserError(f"train.val_interval={config.val_interval}: evaluate every N >= 1 epochs (the last epoch always is)")
    out = workdir.student(name)
    with distributed.sole_writer(out):
        if resume and (out / SUMMARY).is_file():
            return json.loads((out / SUMMARY).read_text())
        if not resume and (out / CHECKPOINT).exists():
            raise UserError(f"{out} already holds a student; pass --resume to continue it or choose another --name")

        distilled = bank.open(workdir.distilled, recipe.data.channels)
        store = labels.LabelStore.open(labels_path, expect_images=len(distilled.images),
                                       expect_classes=recipe.data.num_classes, verify_checksums=distributed.is_main())
        distributed.barrier()  # others wait out rank 0's hashing here, not in DDP's first collective; its errors reach all
        _check_store_fits(store, distilled, recipe)
        record_size = store.meta["batch_size"]
        _check_batching(config, record_size, world)
        arch = config.arch or recipe.model.arch
        torch.manual_seed(config.seed)
        model = models.build_model(arch, recipe.data.num_classes, recipe.data.channels, recipe.model.stem)
        model = models.use_ghost_batch_norm(model, config.bn_batch).to(device)
        memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        split_records = config.split == "records" and world > 1
        if split_records:
            warnings.warn(f"train.split=records departs from the paper: {world} ranks take {world} x {record_size} rows "
                          f"per step and {world}x fewer steps; lr scaled linearly to {config.lr * world:g}", stacklevel=2)
        optimizer = build_optimizer(model, dataclasses.replace(config, lr=config.lr * world) if split_records else config)
        scheduler = build_scheduler(optimizer, config)
        plan = training_plan(store, config.seed, config.full_plan)
        sampler = replay.PlanSampler(plan, rank=rank, world_size=world) if split_records else replay.PlanSampler(plan)
        rows = rank_rows(record_size, rank, world) if world > 1 and not split_records else None
        made_by = _student_identity(recipe, store, world)
        first_epoch, temperatures = 0, Temperatures(config)
        if resume and (out / CHECKPOINT).exists():
            first_epoch = _restore(out / CHECKPOINT, model, optimizer, scheduler, sampler, made_by, temperatures)
        out.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            _trim_metrics(out / METRICS, first_epoch)

        model.train()
        network = model
        if world > 1:
            network = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        no_sync = network.no_sync if world > 1 else contextlib.nullcontext
        loss_fn = make_loss_fn(network, config, device, keep_last=config.calibrate_student)
        batches = replay.make_loader(loader or config.loader, store, distilled.images, sampler, store.meta["size"],
                                     store.meta["mean"], store.meta["std"], device, config.workers)
        val_set = evaluate.validation_set(recipe.data, workdir.listings)

        def validate() -> dict:
            distributed.broadcast_buffers(model)  # every rank's shard scored with rank 0's model
            return evaluate.evaluate(model, recipe.data, device, EVAL_BATCH, config.workers, val_set, bf16=config.bf16)

        last_epoch = config.epochs if stop_after is None else min(config.epochs, first_epoch + stop_after)
        record_images = record_size * (world if split_records else 1)  # images per optimizer step, all ranks
        images_seen, train_seconds, metrics, shown_top1 = 0, 0.0, {}, "-"  # top-1 of the latest evaluation
        bar = tqdm(total=(last_epoch - first_epoch) * len(sampler) * record_images, unit="img",
                   desc=f"train {name}", disable=not distributed.is_main())
        for epoch in range(first_epoch, last_epoch):
            sampler.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            epoch_start = time.perf_counter()
            teacher_t, student_t = temperatures.of_epoch(epoch)
            loss, steps = _train_epoch(batches, functools.partial(loss_fn, temperatures=(teacher_t, student_t)),
                                       optimizer, config.micro_batch, no_sync, device, memory_format,
                                       lambda: bar.update(record_images), rows)
            if loss_fn.last:
                temperatures.calibrate(*loss_fn.last, epoch)
            seconds = time.perf_counter() - epoch_start
            images_seen, train_seconds = images_seen + steps * record_images, train_seconds + seconds
            scheduler.step()
            metrics = {"epoch": epoch, "loss": loss, "lr": lr, "steps": steps, "teacher_temperature": teacher_t,
                       "student_temperature": student_t, "images_per_sec": steps * record_images / seconds,
                       "seconds": seconds}
            if (epoch + 1) % config.val_interval == 0 or epoch + 1 == config.epochs:
                scores = validate()  # its "loss" is the validation CE: keep it apart from the training loss
                metrics.update(top1=scores["top1"], top5=scores["top5"], val_loss=scores["loss"])
                shown_top1 = f"{metrics['top1']:.2f}"
            bar.set_postfix(epoch=epoch, loss=format_loss(loss), top1=shown_top1)
            if distributed.is_main():
                checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(), "epoch": epoch + 1,
                              "temperatures": temperatures.state_dict(),
                              "identity": made_by, "rng_cpu": torch.get_rng_state(),
                              **({"rng_cuda": torch.cuda.get_rng_state()} if device.type == "cuda" else {})}
                write_atomically(out / CHECKPOINT, lambda partial: torch.save(checkpoint, partial))
                with open(out / METRICS, "a") as log:
                    log.write(json.dumps(metrics) + "\n")
            distributed.barrier()
        bar.close()
        if last_epoch < config.epochs:
            return {"name": name, "epochs_done": last_epoch, "finished": False}
        if "top1" not in metrics:  # resumed after the last checkpoint: nothing ran, evaluate now
            metrics = validate()
        return _finish(recipe, workdir, out, model, store, arch, name, metrics, images_seen, train_seconds, wall_start)


def _finish(recipe: Recipe, workdir: WorkDir, out: Path, model: nn.Module, store, arch: str, name: str,
            metrics: dict, images_seen: int, train_seconds: float, wall_start: float) -> dict:
    """Student weights, summary.json and the summary line."""
    from . import evaluate, labels, models

    storage = labels.storage_report(store)
    summary = {
        "name": name, "finished": True, "arch": arch, "epochs": recipe.train.epochs, "labels": str(store.path),
        "records": storage["records"], "label_bytes": storage["bytes_on_disk"],
        "compression_factor": storage["compression_factor"], "top1": metrics["top1"], "top5": metrics["top5"],
        "images_per_sec": images_seen / train_seconds if train_seconds else None,
        "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - wall_start,
    }
    if distributed.is_main():
        models.save_teacher(out / evaluate.STUDENT_FILE, model, recipe, arch=arch, role="student",
                            labels=str(store.path), top1=metrics["top1"])
        (out / SUMMARY).write_text(json.dumps(summary, indent=1))
        rate = f"{summary['images_per_sec']:.0f} img/s" if summary["images_per_sec"] else "no epochs in this call"
        print(f"train {name}: {arch} on {storage['records']} records ({storage['compression_factor']:g}x labels), "
              f"{recipe.train.epochs} epochs: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
              f"{rate}, {summary['wall_seconds']:.0f} s")
    distributed.barrier()
    return summary


def _command(args: argparse.Namespace) -> None:
    recipe = recipe_from_args(args)
    flags = [*(["train.bf16=true"] if args.bf16 else []), *([f"train.split={args.split}"] if args.split else []),
             *([f"train.temperature_schedule={args.temperature_schedule}"] if args.temperature_schedule else []),
             *([f"train.student_temperature={args.student_temperature}"] if args.student_temperature is not None else []),
             *(["train.calibrate_student=true"] if args.calibrate_student else [])]
    recipe = recipe.with_overrides(flags)
    train(recipe, WorkDir.for_recipe(args.workdir, recipe.name), args.labels, args.name, args.device,
          resume=args.resume, loader=args.loader, stop_after=args.stop_after)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a student on the distilled images and a label store")
    add_recipe_arguments(parser)
    parser.add_argument("--labels", required=True, help="label store directory (labels/ or a pruned labels-rR/)")
    parser.add_argument("--name", required=True, help="student name: results go to WORKDIR/students/NAME")
    parser.add_argument("--resume", action="store_true", help="continue from the student's last checkpoint")
    parser.add_argument("--loader", choices=("auto", "dali", "torch"), default=None,
                        help="replay back end (default: recipe train.loader; auto = dali on GPU, torch on CPU)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast for the student (train.bf16); the paper's runs are fp32")
    parser.add_argument("--split", choices=("rows", "records"), default=None,
                        help="under torchrun: rows (default, the paper's: every rank takes its rows of each record, "
                             "one step per record) or records (W records per step, lr x W: faster, not the paper's)")
    parser.add_argument("--temperature-schedule", choices=SCHEDULES, default=None,
                        help="the teacher temperature over epochs (train.temperature_schedule; LPQLD's Dynamic Knowledge "
                             "Reuse: step, with train.temperature_step/_gamma/_floor); default constant, as LPLD")
    parser.add_argument("--student-temperature", type=float, default=None,
                        help="the student's own temperature (train.student_temperature; 0: the teacher's, as LPLD)")
    parser.add_argument("--calibrate-student", action="store_true",
                        help="re-fit the student temperature after every epoch on the grid 0.01..1 (LPQLD's dynamic "
                             "alignment; train.calibrate_student)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                        help="train at most this many epochs now, then stop (continue later with --resume)")
    parser.set_defaults(func=_command)

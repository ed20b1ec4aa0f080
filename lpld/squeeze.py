"""``lpld squeeze``: the teacher, trained from scratch or imported from a local weights file.

SPEC.md section 0, step 1. Training is plain SGD + cosine (stepped per iteration, so a two-epoch
demo still anneals) with the recipe's augmentation, bf16 autocast on GPUs; a checkpoint after
every epoch lets an interrupted run continue. The result is ``WorkDir.teacher`` with its real top-1 in the metadata.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import distributed, identity
from .data import load_real, train_transform
from .atomic import write_atomically
from .errors import UserError
from .evaluate import evaluate
from .models import apply_weights, build_model, load_weights_file, read_teacher_meta, save_teacher
from .recipes import Recipe, add_recipe_arguments, recipe_from_args
from .workdir import WorkDir

CHECKPOINT = "squeeze-checkpoint.pt"


def squeeze(recipe: Recipe, workdir: WorkDir, device: torch.device | str, weights: str | None = None) -> dict:
    """Write the teacher unless it exists; return its metadata (with ``val_top1``)."""
    distributed.init(device)
    device = distributed.device(device)
    with distributed.sole_writer(workdir.teacher):
        weights = weights or recipe.model.weights
        if workdir.teacher.is_file():
            meta = read_teacher_meta(workdir.teacher)
            if distributed.is_main():
                print(f"squeeze: {workdir.teacher} exists (val top-1 {meta.get('val_top1', float('nan')):.2f}%); "
                      "delete it to train again")
            return meta
        started = time.time()
        torch.manual_seed(recipe.squeeze.seed)
        model = build_model(recipe.model.arch, recipe.data.num_classes, recipe.data.channels, recipe.model.stem)
        if weights:
            apply_weights(model, load_weights_file(weights), weights)
            model.to(device)
            source = {"source": str(Path(weights).resolve())}
        else:
            source = {"source": "trained", "epochs": recipe.squeeze.epochs,
                      "train_images": _train(model, recipe, workdir, device)}
        scores = evaluate(model, recipe.data, device, batch_size=recipe.squeeze.batch_size, workers=recipe.squeeze.workers)
        meta = {"val_top1": scores["top1"], **source}
        if distributed.is_main():
            meta = save_teacher(workdir.teacher, model.cpu(), recipe, **meta)
            (workdir.root / CHECKPOINT).unlink(missing_ok=True)
            print(f"squeeze: {recipe.model.arch} ({recipe.model.stem} stem) val top-1 {scores['top1']:.2f}% "
                  f"on {scores['images']} images, {time.time() - started:.0f} s -> {workdir.teacher}")
        distributed.barrier()
        return meta


def _train(model: torch.nn.Module, recipe: Recipe, workdir: WorkDir, device: torch.device) -> int:
    """SGD + per-iteration cosine from ``squeeze.lr`` to 0, resuming from the last finished epoch;
    returns the size of the training split (for throughput)."""
    cfg = recipe.squeeze
    dataset = load_real(recipe.data, "train", train_transform(recipe.data, kind=cfg.augment), workdir.listings)
    sampler = DistributedSampler(dataset, distributed.world_size(), distributed.rank(), shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0)
    if len(loader) == 0:
        raise UserError(f"the training split ({len(dataset)} images) is smaller than one batch of {cfg.batch_size}: "
                        "lower --set squeeze.batch_size")
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * len(loader))
    first_epoch = _resume(workdir.root / CHECKPOINT, recipe, model, optimizer, schedule)
    network = DistributedDataParallel(model) if distributed.world_size() > 1 else model
    network.train()
    for epoch in range(first_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        progress = tqdm(loader, desc=f"squeeze epoch {epoch + 1}/{cfg.epochs}", disable=not distributed.is_main())
        seen, tick = 0, time.time()
        for step, (images, labels) in enumerate(progress):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(network(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(labels) * distributed.world_size()
            if step % 50 == 0:  # reading the loss waits for the device: not on every step
                progress.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.time() - tick):.0f}")
        if distributed.is_main():
            _save_checkpoint(workdir.root / CHECKPOINT, recipe, model, optimizer, schedule, epoch + 1)
        distributed.barrier()
    model.eval()
    return len(dataset)


def _teacher_identity(recipe: Recipe) -> dict:
    """What a teacher checkpoint must share with the run resuming it."""
    return identity.of(**recipe.settings("data", "model", "squeeze"))


def _save_checkpoint(path: Path, recipe: Recipe, model, optimizer, schedule, epochs_done: int) -> None:
    state = {"identity": _teacher_identity(recipe), "epoch": epochs_done, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
    write_atomically(path, lambda partial: torch.save(state, partial))


def _resume(path: Path, recipe: Recipe, model, optimizer, schedule) -> int:
    """Load the checkpoint if there is one; return the first epoch still to train."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    identity.check(state.get("identity"), _teacher_identity(recipe), path, "delete it to start the teacher afresh")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if distributed.is_main():
        print(f"squeeze: resuming after epoch {state['epoch']} from {path}")
    return state["epoch"]


def _command(args: argparse.Namespace) -> None:
    recipe = recipe_from_args(args)
    squeeze(recipe, WorkDir.for_recipe(args.workdir, recipe.name), distributed.device(args.device), args.weights)


def register(subparsers) -> None:
    parser = subparsers.add_parser("squeeze", help="train the teacher (or import --weights) and report its val top-1")
    add_recipe_arguments(parser)
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="a local torchvision state dict (.safetensors/.pth) to use instead of training")
    parser.set_defaults(func=_command)

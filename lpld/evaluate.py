"""Top-1 / top-5 accuracy on the REAL validation split (SPEC.md sections 6 and 10.10).

The view is ``lpld.data.eval_transform``: ImageNet Resize 256 -> CenterCrop 224, Tiny-ImageNet at
its native 64 px, Fashion-MNIST at its native 28 px. Batched under ``torch.inference_mode``; under
torchrun each rank scores every W-th image and the counts are summed, so any world size gives the
same numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import distributed
from .errors import UserError
from .recipes import DataConfig, add_recipe_arguments, recipe_from_args
from .workdir import WorkDir

STUDENT_FILE = "student.safetensors"


def validation_set(data: DataConfig, listings: Path | None = None) -> Dataset:
    """The real val split in the evaluation view; ``listings`` (``WorkDir.listings``) caches its listing."""
    from . import data as datasets

    return datasets.load_real(data, "val", datasets.eval_transform(data), listings)


def evaluate(model: nn.Module, data: DataConfig, device: torch.device | str = "cpu", batch_size: int = 256,
             workers: int = 0, dataset: Dataset | None = None, bf16: bool = False) -> dict:
    """{"top1", "top5" (percent), "loss" (mean cross-entropy), "images"} of ``model`` on the val split.

    ``dataset`` (pairs of normalized image, label) defaults to ``validation_set(data)``. float32
    unless ``bf16`` (autocast; the paper's numbers are fp32). The model's train/eval mode is
    restored afterwards.
    """
    device = torch.device(device)
    dataset = validation_set(data) if dataset is None else dataset
    rank, world = distributed.rank(), distributed.world_size()
    shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, count
    was_training = model.training
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model(images).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels[:, None]
            totals[0] += hits[:, 0].sum()
            totals[1] += hits.any(dim=1).sum()
            totals[2] += F.cross_entropy(logits, labels, reduction="sum")
            totals[3] += len(labels)
    model.train(was_training)
    top1, top5, loss, count = distributed.all_reduce_sum(totals).tolist()
    if count == 0:
        raise UserError("the validation split is empty; check --data")
    return {"top1": 100 * top1 / count, "top5": 100 * top5 / count, "loss": loss / count, "images": int(count)}


def load_network(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A teacher or student file (safetensors + lpld metadata: arch, stem, channels, classes), in eval mode."""
    from . import models

    meta = models.read_teacher_meta(path)
    model = models.build_model(meta["arch"], meta["num_classes"], meta["channels"], meta["stem"])
    models.apply_weights(model, models.load_weights_file(path), str(path))
    return model.eval().to(device)


def _command(args: argparse.Namespace) -> None:
    recipe = recipe_from_args(args)
    workdir = WorkDir.for_recipe(args.workdir, recipe.name)
    distributed.init(args.device)
    device = distributed.device(args.device)
    if args.weights:
        path = Path(args.weights)
    elif args.student:
        path = workdir.student(args.student) / STUDENT_FILE
    else:
        path = workdir.teacher
    if not path.is_file():
        raise UserError(f"no network at {path}: train it first (lpld squeeze / lpld train) or pass --weights FILE")
    metrics = evaluate(load_network(path, device), recipe.data, device, args.batch_size, args.workers,
                       validation_set(recipe.data, workdir.listings), bf16=recipe.train.bf16)
    if distributed.is_main():
        print(f"eval {path}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
              f"loss {metrics['loss']:.4f}  ({metrics['images']} {recipe.data.dataset} val images)")
        print(json.dumps(metrics))


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="top-1/top-5 of the teacher or a student on the real val split")
    add_recipe_arguments(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--student", metavar="NAME", help="evaluate workdir/students/NAME (default: the teacher)")
    which.add_argument("--weights", metavar="FILE", help="evaluate this teacher/student .safetensors file")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.set_defaults(func=_command)

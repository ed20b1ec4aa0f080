"""The distilled ImageFolder on disk: file names, writing the images, and recover's resume bookkeeping.

``lpld recover`` (and ``lpld import images``) write one folder per class with zero-padded names,
so sorted names are class order for any class count, and the image index of a sorted listing is
the label store's ``img_idx`` (SPEC.md section 11.3). Which jobs are finished lives in
``manifest.json`` plus one append-only JSONL per rank, so ranks never write the same file and a
crash loses only the jobs in flight. The decoded pixels of the finished folder sit beside it in
the image bank (``lpld.bank``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch
import torchvision

from . import identity
from .atomic import write_atomically
from .errors import UserError
from .recipes import Recipe

IMAGE_FORMATS = {"jpeg": "jpg", "png": "png"}
MANIFEST = "manifest.json"


class Job(Protocol):
    """What the folder needs of a unit of resume (``recover.Job``): its key and each image's class
    and index within the class."""

    key: str
    classes: tuple[int, ...]
    indices: tuple[int, ...]

    def __len__(self) -> int: ...


def class_folder(label: int, num_classes: int) -> str:
    """``c00042``: zero-padded so that sorted folder names are class order, for any class count."""
    return f"c{label:0{max(5, len(str(num_classes - 1)))}d}"


def image_name(label: int, index: int, num_classes: int, ipc: int, ext: str) -> str:
    return f"{class_folder(label, num_classes)}_i{index:0{max(4, len(str(ipc - 1)))}d}.{ext}"


def save_images(root: Path, job: Job, pixels: torch.Tensor, recipe: Recipe) -> None:
    """Write the job's images as uint8 by truncation (as upstream), JPEG at the recipe quality or PNG;
    a 1-channel image is written as grayscale."""
    cfg, num_classes = recipe.recover, recipe.data.num_classes
    ext = IMAGE_FORMATS[cfg.image_format]
    images = (pixels.float() * 255).to(torch.uint8).cpu()
    for image, label, index in zip(images, job.classes, job.indices):
        folder = root / class_folder(label, num_classes)
        folder.mkdir(parents=True, exist_ok=True)
        path = str(folder / image_name(label, index, num_classes, cfg.ipc, ext))
        if cfg.image_format == "jpeg":
            torchvision.io.write_jpeg(image, path, quality=cfg.jpeg_quality)
        else:
            torchvision.io.write_png(image, path)


class Progress:
    """Which jobs are finished: manifest.json plus one append-only JSONL per rank for the jobs
    finished since, so that ranks never write the same file and a crash loses only jobs in flight."""

    def __init__(self, root: Path, recipe: Recipe, made_by: dict):
        """``made_by``: the images' identity (``lpld.identity.of``), kept in the manifest."""
        self.root, self.recipe, self.made_by = root, recipe, made_by
        self.manifest_path = root / MANIFEST

    def read_manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{self.manifest_path} is corrupt ({error}); delete {self.root} to start over") from None
        identity.check(manifest.get("identity"), self.made_by, self.root,
                       "delete it, or use another --workdir, to recover with these")
        return manifest

    def completed(self, jobs: list[Job]) -> dict[str, dict]:
        """Finished jobs whose image files all exist."""
        manifest = self.read_manifest() or {}
        done = dict(manifest.get("completed", {}))
        for path in sorted(self.root.glob("progress-rank*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash: that job is redone
                    continue
                done[entry.pop("job")] = entry
        cfg, num_classes = self.recipe.recover, self.recipe.data.num_classes
        ext = IMAGE_FORMATS[cfg.image_format]
        return {job.key: done[job.key] for job in jobs if job.key in done and all(
            (self.root / class_folder(c, num_classes) / image_name(c, i, num_classes, cfg.ipc, ext)).exists()
            for c, i in zip(job.classes, job.indices))}

    def record(self, rank: int, job: Job, seconds: float) -> None:
        with open(self.root / f"progress-rank{rank}.jsonl", "a") as handle:
            handle.write(json.dumps({"job": job.key, "images": len(job), "rank": rank, "seconds": round(seconds, 3)}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def write_manifest(self, fields: dict, jobs: list[Job]) -> dict:
        """Fold the per-rank records into manifest.json (atomically) and drop them."""
        completed = self.completed(jobs)
        manifest = {**fields, "identity": self.made_by, "completed": dict(sorted(completed.items())),
                    "complete": len(completed) == len(jobs)}
        write_atomically(self.manifest_path, lambda partial: partial.write_text(json.dumps(manifest, indent=1)))
        for path in self.root.glob("progress-rank*.jsonl"):
            path.unlink()
        return manifest

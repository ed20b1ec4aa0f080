"""Analyses of distilled (or real) image sets.

``diversity`` (paper Table 1): the mean cosine similarity between the teacher's penultimate
features of two different images of the same class. Class-wise recovery is meant to lower it
against SRe2L's across-class batches, where every image of a class is pushed to the same global
statistics; ``real_diversity`` measures a sample of the real training images, the reference.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from . import bank, data, distributed, models
from .errors import UserError
from .imagefolder import class_folder
from .recipes import Recipe, add_recipe_arguments, recipe_from_args
from .workdir import WorkDir


@dataclass(frozen=True)
class Diversity:
    per_class: dict[str, float]  # class name -> mean within-class cosine similarity
    mean: float  # over classes with at least two images

    def to_dict(self) -> dict:
        return {"mean_cosine": self.mean, "per_class": self.per_class}


def penultimate_features(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256,
                         prepare=lambda batch: batch) -> torch.Tensor:
    """The input of the model's last ``nn.Linear`` (the classifier) for each image, flattened.

    A forward hook keeps this independent of the architecture. ``prepare`` turns one batch of
    ``images`` into the model's input, so a large uint8 set is never converted to float at once.
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise UserError("the teacher has no nn.Linear classifier to take penultimate features from")
    kept = []
    handle = linears[-1].register_forward_hook(lambda module, inputs, output: kept.append(inputs[0].flatten(1)))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in images.split(batch_size):
                model(prepare(batch.to(device)))
    finally:
        handle.remove()
    return torch.cat(kept).cpu()


def within_class_cosine(features: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Per class: the mean cosine similarity over ordered pairs (i, j), i != j, of its samples."""
    unit = F.normalize(features.double(), dim=1)
    result = {}
    for label in labels.unique().tolist():
        members = unit[labels == label]
        n = len(members)
        if n > 1:
            similarity = members @ members.T
            result[label] = float((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1)))
    return result


def teacher_inputs(images: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """uint8 images -> the teacher's normalized float input at the recipe resolution."""
    pixels = images.float() / 255
    if pixels.shape[-2:] != (recipe.data.resolution,) * 2:
        pixels = F.interpolate(pixels, size=recipe.data.resolution, mode="bilinear", antialias=True)
    mean = torch.tensor(recipe.data.mean, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(recipe.data.std, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean) / std


def diversity_of(images: torch.Tensor, labels: torch.Tensor, classes: list[str], recipe: Recipe,
                 teacher: torch.nn.Module, where: str) -> Diversity:
    """Within-class feature similarity of uint8 ``images`` [N, C, H, W] with these labels under ``teacher``."""
    features = penultimate_features(teacher, images, prepare=lambda batch: teacher_inputs(batch, recipe))
    per_label = within_class_cosine(features, labels)
    if not per_label:
        raise UserError(f"{where}: no class has two images, so no within-class similarity exists")
    per_class = {classes[label]: value for label, value in sorted(per_label.items())}
    return Diversity(per_class, sum(per_class.values()) / len(per_class))


def diversity(path: str | Path, recipe: Recipe, teacher_path: str | Path, device) -> Diversity:
    """Within-class feature similarity of the ImageFolder at ``path`` under the given teacher."""
    images = bank.open(path, recipe.data.channels)
    teacher = models.load_teacher(teacher_path, recipe, device)
    return diversity_of(images.images, images.labels, images.classes, recipe, teacher, str(path))


def real_sample(recipe: Recipe, per_class: int, seed: int = 0, listings: Path | None = None):
    """(uint8 images [K * n, C, R, R], labels, class names): ``per_class`` real training images of each
    class, a seeded choice, resized and centre-cropped to the recipe resolution R (no augmentation)."""
    resolution = recipe.data.resolution
    view = v2.Compose([v2.Resize(resolution, antialias=True), v2.CenterCrop(resolution)])
    dataset = data.load_real(recipe.data, "train", view, listings)
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for label in range(len(dataset.classes)):
        members = (dataset.targets == label).nonzero().flatten()
        picks += members[torch.randperm(len(members), generator=generator)[:per_class]].tolist()
    images = torch.stack([dataset[index][0] for index in picks])
    # named as the distilled folders name classes (c00042), so the report lines the sets up class by class
    return images, dataset.targets[picks], [class_folder(label, len(dataset.classes)) for label in range(len(dataset.classes))]


def real_diversity(recipe: Recipe, teacher_path: str | Path, device, per_class: int,
                   listings: Path | None = None) -> Diversity:
    """The same measure on a sample of the real training images: the reference the paper's Table 1
    sets distilled sets against."""
    images, labels, classes = real_sample(recipe, per_class, listings=listings)
    teacher = models.load_teacher(teacher_path, recipe, device)
    return diversity_of(images, labels, classes, recipe, teacher, f"{recipe.data.root} (real train images)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help="analyses of distilled images")
    analyses = parser.add_subparsers(dest="analysis", required=True)
    similarity = analyses.add_parser(
        "diversity", help="mean within-class cosine similarity of teacher penultimate features (paper Table 1)")
    similarity.add_argument("path", help="an ImageFolder of same-size images (e.g. RUN/distilled); its image bank "
                                             "is built beside the images when missing")
    add_recipe_arguments(similarity)
    similarity.add_argument("--teacher", default=None, help="teacher weights (default: the work directory's)")
    similarity.add_argument("--name", default=None,
                            help="name of the analysed set in the work directory's analysis/diversity-NAME.json "
                                 "(default: the batching in PATH/manifest.json, else PATH's folder name)")
    similarity.add_argument("--json", default=None, help="also write the report to this JSON file")
    similarity.set_defaults(func=_diversity_main)


def set_name(path: str | Path) -> str:
    """What an analysed folder is: the batching its recover manifest records (class-wise,
    across-class; "-global-stats" for the "+C" ablation), else the folder's own name (e.g. a folder
    of real images)."""
    manifest = Path(path) / "manifest.json"
    if manifest.is_file():
        content = json.loads(manifest.read_text())
        if content.get("batching"):
            ablation = content.get("recipe", {}).get("recover", {}).get("stats") == "global"
            return content["batching"] + ("-global-stats" if ablation else "")
    return Path(path).resolve().name


def _diversity_main(args: argparse.Namespace) -> None:
    recipe = recipe_from_args(args)
    workdir = WorkDir.for_recipe(args.workdir, recipe.name)
    teacher = args.teacher or workdir.teacher
    report = diversity(args.path, recipe, teacher, distributed.device(args.device))
    for name, value in report.per_class.items():
        print(f"{name}\t{value:.4f}")
    print(f"diversity: mean within-class cosine similarity {report.mean:.4f} over {len(report.per_class)} classes "
          f"({args.path})")
    name = args.name or set_name(args.path)
    write_diversity(workdir, name, args.path, report, *([Path(args.json)] if args.json else []))
    print(f"diversity: written to {workdir.diversity(name)} (read by `lpld report`)")


def write_diversity(workdir: WorkDir, name: str, path: str | Path, report: Diversity, *copies: Path) -> None:
    """The analysis file `lpld report` reads (workdir/analysis/diversity-NAME.json), and any copies."""
    document = json.dumps({"name": name, "path": str(path), **report.to_dict()}, indent=1)
    for target in (workdir.diversity(name), *copies):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(document)

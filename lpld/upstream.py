"""``lpld import``: the original project's released artifacts, converted into our formats.

Upstream (he-y/soft-label-pruning-for-dataset-distillation, SPEC.md sections 1-5) ships class-BN
teacher checkpoints, distilled image folders and soft-label directories. This module is the only
place that knows those formats (DESIGN.md): each sub-command reads local files, checks them, and
writes our artifacts through our own writers (``models.save_teacher``, ``ClassBNStats.save``,
the recover folder naming, ``LabelStoreWriter``), with the identity fields the stages check.

Nothing is downloaded and loading never runs code (``torchfiles.load_plain``). The soft-label
directories are converted by ``upstream_labels``; the teachers and images here.

Facts used (read from upstream's code, SPEC.md):
- teachers: ``{"model": state_dict}`` (class-BN forward pass, Tiny teacher; the Tiny one also
  holds optimizer, lr_scheduler, epoch and args), or a flat / ``{"state_dict": {"module."...}}``
  dict (the ImageNet-21K-P timm ResNet-18, read by upstream with its own loader that skips
  ``num_batches_tracked``). timm's resnet18 names its tensors as torchvision does. Every BN of a
  class-BN model adds ``class_running_mean`` / ``class_running_var`` [K, C].
- images: ``new{c:03d}/class{c:03d}_id{k:03d}.jpg``; upstream's ImageFolder lists folders and files
  as sorted strings, so past 1000 classes its image index order is not class order.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import bank, distributed, models
from .atomic import write_atomically
from .data import IMAGE_SUFFIXES
from .errors import UserError
from .fingerprint import file_sha256
from .imagefolder import IMAGE_FORMATS, MANIFEST, class_folder, image_name
from .recipes import Recipe, add_recipe_arguments, recipe_from_args
from .stats import ClassBNStats, LayerStats
from .torchfiles import load_plain
from .upstream_labels import UPSTREAM_ORDER_SEED, import_labels
from .upstream_lpqld import import_lpqld_labels, is_lpqld_directory
from .workdir import WorkDir

UPSTREAM_MOMENTUM = 0.1  # the BN default its class statistics were folded with (SPEC.md section 2)
CLASS_KEYS = ("class_running_mean", "class_running_var")
DROPPED_TOP_LEVEL = ("optimizer", "lr_scheduler", "epoch", "args", "model_ema", "scaler")
FOLDER = re.compile(r"new(\d+)")
FILE = re.compile(r"class(\d+)_id(\d+)\.(\w+)")


# ----------------------------------------------------------------------------------------- teacher

def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of an upstream checkpoint and notes on what was unwrapped or dropped."""
    state = load_plain(path, [argparse.Namespace])
    notes = []
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                others = sorted(k for k in state if k != wrapper)
                unknown = [k for k in others if k not in DROPPED_TOP_LEVEL]
                if unknown:
                    raise UserError(f"{path}: unknown top-level entries {unknown} next to {wrapper!r}; "
                                    f"expected only {', '.join(DROPPED_TOP_LEVEL)}")
                notes.append(f"read {wrapper!r}" + (f", dropped {', '.join(others)}" if others else ""))
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict (a mapping of names to tensors), directly or under "
                        "'model' / 'state_dict'")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
        notes.append("removed the 'module.' prefix")
    return state, notes


def split_checkpoint(state: dict[str, torch.Tensor], model: torch.nn.Module, source: str):
    """(weights for ``model``, {bn: (class mean, class var)}, notes); unknown keys are an error."""
    expected = model.state_dict()
    weights, classes, unknown = {}, {}, []
    for key, value in state.items():
        layer, _, leaf = key.rpartition(".")
        if leaf in CLASS_KEYS:
            classes.setdefault(layer, {})[leaf] = value
        elif key in expected:
            weights[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{source}: keys the recipe's {model.__class__.__name__} does not have: {sorted(unknown)[:8]}"
                        f"{'...' if len(unknown) > 8 else ''}; check --recipe and --set model.arch/model.stem")
    notes = []
    counters = [key for key in expected if key.endswith("num_batches_tracked") and key not in weights]
    for key in counters:
        weights[key] = torch.zeros_like(expected[key])
    if counters:
        notes.append(f"filled {len(counters)} missing num_batches_tracked with 0 (unused in eval mode)")
    return weights, classes, notes


def class_stats(classes: dict, model: torch.nn.Module, num_classes: int, source: str) -> dict[str, LayerStats]:
    """Upstream's per-class buffers as our statistics layers; every BN must have both, [K, C]."""
    layers = {}
    for name, bn in models.bn_layers(model):
        found = classes.pop(name, {})
        if set(found) != set(CLASS_KEYS):
            raise UserError(f"{source}: BN layer {name} lacks {sorted(set(CLASS_KEYS) - set(found))}; "
                            "a class-BN checkpoint has class_running_mean/var on every BN layer")
        mean, var = found["class_running_mean"], found["class_running_var"]
        if mean.shape != (num_classes, bn.num_features) or var.shape != mean.shape:
            raise UserError(f"{source}: {name}.class_running_mean/var have shapes {tuple(mean.shape)}/"
                            f"{tuple(var.shape)}, expected {(num_classes, bn.num_features)} (classes x channels)")
        count = torch.full((num_classes,), -1, dtype=torch.int64)  # upstream does not record counts
        layers[name] = LayerStats(mean.float().clone(), var.float().clone(), count)
    if classes:
        raise UserError(f"{source}: class statistics on layers that are not BN layers of the model: {sorted(classes)[:5]}")
    return layers


def import_teacher(path: str | Path, recipe: Recipe, workdir: WorkDir) -> dict:
    """An upstream checkpoint -> teacher.safetensors (+ class_bn_stats.safetensors for class-BN ones)."""
    with distributed.sole_writer(workdir.teacher):
        for target in (workdir.teacher, workdir.stats):
            if target.exists():
                raise UserError(f"{target} exists; delete it or import into another --workdir")
        source = str(path)
        state, notes = read_checkpoint(path)
        model = models.build_model(recipe.model.arch, recipe.data.num_classes, recipe.data.channels, recipe.model.stem)
        weights, classes, more = split_checkpoint(state, model, source)
        models.apply_weights(model, weights, source)
        notes += more
        layers = class_stats(classes, model, recipe.data.num_classes, source) if classes else None
        if layers:
            notes.append(f"mapped class_running_mean/var of {len(layers)} BN layers to class statistics (counts unknown: -1)")
        origin = {"path": os.path.abspath(source), "sha256": file_sha256(path), "notes": notes}
        meta = models.save_teacher(workdir.teacher, model, recipe, imported_from=origin)
        if layers is not None:
            ClassBNStats(layers, {
                "num_classes": recipe.data.num_classes, "mode": "ema", "momentum": UPSTREAM_MOMENTUM,
                "teacher_fingerprint": meta["fingerprint"], "arch": recipe.model.arch, "stem": recipe.model.stem,
                "resolution": recipe.data.resolution, "recipe": recipe.name, "world_size": None, "images": None,
                "imported_from": origin,
            }).save(workdir.stats)
        summary = {"teacher": str(workdir.teacher), "fingerprint": meta["fingerprint"], "notes": notes,
                   "stats": str(workdir.stats) if layers else None, "bn_layers": len(layers or {})}
        stats_note = f" + class statistics of {len(layers)} BN layers -> {workdir.stats}" if layers else " (no class statistics)"
        print(f"import teacher: {source} -> {workdir.teacher} ({recipe.model.arch}, {recipe.data.num_classes} classes, "
              f"fingerprint {meta['fingerprint']}){stats_note}; {'; '.join(notes) or 'nothing mapped or dropped'}")
        return summary


# ------------------------------------------------------------------------------------------ images

def class_id_order(names: list[str]) -> list[str]:
    """Upstream class folder names (``new000``...) in class order: by the number, not the string,
    which ImageFolder would use (``new1000`` sorts before ``new101``)."""
    parsed = []
    for name in names:
        match = FOLDER.fullmatch(name)
        if not match:
            raise UserError(f"folder {name!r} is not an upstream class folder (new<class id>, e.g. new000)")
        parsed.append((int(match.group(1)), name))
    return [name for _, name in sorted(parsed)]


def _listing(root: Path, num_classes: int) -> dict[int, tuple[str, list[tuple[int, str]]]]:
    """{class id: (folder, [(image id, file name)] sorted by image id)} of an upstream image folder."""
    if not root.is_dir():
        raise UserError(f"upstream image folder {root} does not exist")
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not names:
        raise UserError(f"{root} has no class folders: expected {root}/new000/class000_id000.jpg ...")
    listing = {}
    for name in class_id_order(names):
        label = int(FOLDER.fullmatch(name).group(1))
        if label in listing:
            raise UserError(f"{root} has two folders for class {label}")
        images = []
        for file in sorted(entry.name for entry in os.scandir(root / name) if entry.is_file()):
            match = FILE.fullmatch(file)
            if not match or not file.lower().endswith(IMAGE_SUFFIXES) or int(match.group(1)) != label:
                raise UserError(f"{root / name / file}: expected class{label:03d}_id<k>.jpg in folder {name}")
            images.append((int(match.group(2)), file))
        if not images:
            raise UserError(f"class folder {root / name} is empty")
        listing[label] = (name, sorted(images))
    missing = sorted(set(range(num_classes)) - set(listing))
    extra = sorted(set(listing) - set(range(num_classes)))
    if missing or extra:
        raise UserError(f"{root} holds {len(listing)} classes but the recipe has {num_classes}: missing class ids "
                        f"{missing[:5]}, unexpected {extra[:5]}; pick the matching --recipe or --set data.num_classes")
    return listing


def upstream_to_ours(listing: dict[int, tuple[str, list[tuple[int, str]]]]) -> list[int]:
    """For each index of upstream's ImageFolder listing (string-sorted folders, then string-sorted
    files), the index of the same image in ours (class order, then image id)."""
    ours, index = {}, 0
    for label in sorted(listing):
        for _, file in listing[label][1]:
            ours[(label, file)] = index
            index += 1
    folders = sorted(listing, key=lambda label: listing[label][0])
    return [ours[(label, file)] for label in folders for file in sorted(file for _, file in listing[label][1])]


def import_images(path: str | Path, recipe: Recipe, workdir: WorkDir) -> dict:
    """Copy an upstream image folder (bytes unchanged) into our distilled layout + manifest.json."""
    root, out = Path(path), workdir.distilled
    with distributed.sole_writer(out):
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} exists and is not empty; delete it or import into another --workdir")
        num_classes = recipe.data.num_classes
        listing = _listing(root, num_classes)
        suffixes = {Path(file).suffix.lower() for _, images in listing.values() for _, file in images}
        formats = {"jpeg" if suffix in (".jpg", ".jpeg") else suffix[1:] for suffix in suffixes}
        if len(formats) != 1 or not formats <= set(IMAGE_FORMATS):
            raise UserError(f"{root} mixes or uses unsupported image types {sorted(suffixes)}; expected all .jpg or all .png")
        image_format = formats.pop()
        ipc = max(len(images) for _, images in listing.values())
        total = sum(len(images) for _, images in listing.values())
        started = time.perf_counter()
        with tqdm(total=total, unit="img", desc="import images") as bar:
            for label, (source, images) in sorted(listing.items()):
                folder = out / class_folder(label, num_classes)
                folder.mkdir(parents=True, exist_ok=True)
                for image_id, file in images:
                    name = image_name(label, image_id, num_classes, ipc, IMAGE_FORMATS[image_format])
                    shutil.copyfile(root / source / file, folder / name)
                    bar.update()
        distilled = bank.open(out, recipe.data.channels)
        mapping = upstream_to_ours(listing)
        manifest = {
            "format": "lpld-distilled/1", "num_classes": num_classes, "ipc": ipc, "image_format": image_format,
            "complete": True, "completed": {}, "recipe": recipe.to_dict(),
            "identity": {"imported": {"path": os.path.abspath(root), "fingerprint": distilled.fingerprint}},
            "imported_from": {"path": os.path.abspath(root), "layout": "upstream new<class>/class<class>_id<k>",
                              "images": total, "fingerprint": distilled.fingerprint},
            "upstream_to_ours": mapping,
        }
        write_atomically(out / MANIFEST, lambda partial: partial.write_text(json.dumps(manifest)))
        moved = sum(1 for i, j in enumerate(mapping) if i != j)
        print(f"import images: {total} images of {num_classes} classes ({ipc} per class, "
              f"{distilled.images.shape[-2]}x{distilled.images.shape[-1]}) from {root} -> {out} in "
              f"{time.perf_counter() - started:.1f} s; {moved} upstream indices differ from class order "
              f"(string-sorted folders past 1000 classes); fingerprint {distilled.fingerprint}")
        return {"images": total, "fingerprint": distilled.fingerprint, "reordered": moved}


# --------------------------------------------------------------------------------------------- CLI

def _teacher(args: argparse.Namespace) -> None:
    recipe = recipe_from_args(args)
    import_teacher(args.path, recipe, WorkDir.for_recipe(args.workdir, recipe.name))


def _images(args: argparse.Namespace) -> None:
    recipe = recipe_from_args(args)
    import_images(args.path, recipe, WorkDir.for_recipe(args.workdir, recipe.name))


def _labels(args: argparse.Namespace) -> None:
    recipe = recipe_from_args(args)
    workdir = WorkDir.for_recipe(args.workdir, recipe.name)
    if Path(args.path).is_dir() and is_lpqld_directory(Path(args.path)):
        import_lpqld_labels(args.path, recipe, workdir, args.out, args.ratio)
    else:
        import_labels(args.path, recipe, workdir, args.out, args.ratio, args.order_seed)


def register(subparsers) -> None:
    parser = subparsers.add_parser("import", help="convert upstream's released teachers, images and soft labels")
    actions = parser.add_subparsers(dest="action", required=True)
    teacher = actions.add_parser("teacher", help="a class-BN, Tiny or ImageNet-21K-P checkpoint -> teacher (+ stats)")
    images = actions.add_parser("images", help="a new000/class000_id000.jpg folder -> distilled/")
    labels = actions.add_parser("labels", help="an epoch_<e>/batch_<b>.tar directory (LPLD) or a flat batch_<n>.tar one "
                                               "(LPQLD, top-k included) -> a label store (import images first)")
    for sub, func, what in ((teacher, _teacher, "checkpoint file (.pth)"), (images, _images, "upstream image folder"),
                            (labels, _labels, "upstream soft-label directory")):
        sub.add_argument("path", help=what)
        add_recipe_arguments(sub)
        sub.set_defaults(func=func)
    labels.add_argument("--ratio", type=float, help="upstream's --prune_ratio of a 'less label' directory")
    labels.add_argument("--out", help="output store (default: WORKDIR/labels, or WORKDIR/labels-rR when pruned)")
    labels.add_argument("--order-seed", type=int, default=UPSTREAM_ORDER_SEED, help="upstream's --fkd-seed (default 42)")

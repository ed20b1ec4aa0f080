"""The report's first section: the distilled images, a grid per class, for every image set found.

This run's set, any ``--compare`` set, and sibling work directories of the same recipe recovered
with another batching (e.g. runs/fmnist-across-class beside runs/fmnist) are drawn side by side:
each class's images upscaled by an integer factor without smoothing, labelled with the data set's
class names, plus one overview picture of all of them (the README's).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .page import Page, Picture, pyplot, read_json
from .workdir import WorkDir

GRID_TILE = 56  # upscale distilled images by an integer factor to at least this many pixels per side
GRID_PADDING = 2
GRID_COLUMNS = 10
MAX_SHOWN_CLASSES = 20  # more classes than this: show an evenly spread subset (choose with --classes)
SUBSET_CLASSES = 10
MAX_SHOWN_IMAGES = 50  # per class and set


@dataclass(frozen=True)
class ImageSet:
    name: str  # analyze.set_name: the batching (class-wise, across-class, ...) or the folder's name
    path: Path  # the ImageFolder
    manifest: dict  # recover's manifest.json ({} when absent)


def _image_set(folder: Path) -> ImageSet:
    """Named as ``lpld analyze diversity`` names the set, so its grid and its diversity series match."""
    from .analyze import set_name

    return ImageSet(set_name(folder), folder, read_json(folder / "manifest.json") or {})


def image_sets(workdir: WorkDir, compare: list[str | Path] = ()) -> list[ImageSet]:
    """This run's distilled set, then the sets to show beside it: each ``compare`` entry (a work
    directory or an ImageFolder) and every sibling work directory of the same recipe whose recover
    used another batching (e.g. runs/fmnist-across-class beside runs/fmnist)."""
    if not workdir.distilled.is_dir():
        return []
    sets = [_image_set(workdir.distilled)]
    for entry in map(Path, compare):
        folder = WorkDir(entry).distilled if WorkDir(entry).distilled.is_dir() else entry
        if not folder.is_dir():
            raise UserError(f"--compare {entry}: neither a work directory with distilled/ nor an image folder")
        sets.append(_image_set(folder))
    recipe_name = sets[0].manifest.get("recipe", {}).get("name")
    if recipe_name:
        for sibling in sorted(workdir.root.resolve().parent.iterdir()):
            folder = WorkDir(sibling).distilled
            if sibling == workdir.root.resolve() or not (folder / "manifest.json").is_file():
                continue
            found = _image_set(folder)
            if (found.manifest.get("recipe", {}).get("name") == recipe_name
                    and found.name not in {s.name for s in sets}
                    and folder.resolve() not in {s.path.resolve() for s in sets}):
                sets.append(found)
    names = [s.name for s in sets]
    return [ImageSet(s.name if names.count(s.name) == 1 else f"{s.name} ({s.path})", s.path, s.manifest)
            for s in sets]


def class_names(manifest: dict, folders: list[str]) -> dict[str, str]:
    """Class folder (c00042) -> the data set's class name where it can be known without reading
    images: Fashion-MNIST's names, or the real train/ folder names of an ImageFolder recipe."""
    from . import data

    recipe_data = manifest.get("recipe", {}).get("data", {})
    names: list[str] = []
    if recipe_data.get("dataset") == "fmnist":
        names = list(data.FMNIST_CLASSES)
    elif recipe_data.get("root") and (Path(recipe_data["root"]) / "train").is_dir():
        names = sorted(entry.name for entry in (Path(recipe_data["root"]) / "train").iterdir() if entry.is_dir())
    result = {}
    for folder in folders:
        match = re.fullmatch(r"c(\d+)", folder)
        index = int(match.group(1)) if match else None
        result[folder] = names[index] if index is not None and index < len(names) else folder
    return result


def choose_classes(folders: list[str], names: dict[str, str], wanted: str | None) -> list[str]:
    """``--classes`` (comma-separated indices, class names or folder names) or, by default, every
    class of a small set and an evenly spread subset of a large one."""
    if wanted:
        chosen = []
        lookup = {**{f.lower(): f for f in folders}, **{names[f].lower(): f for f in folders}}
        for item in (part.strip() for part in wanted.split(",") if part.strip()):
            if item.isdigit() and int(item) < len(folders):
                chosen.append(folders[int(item)])
            elif item.lower() in lookup:
                chosen.append(lookup[item.lower()])
            else:
                raise UserError(f"--classes: {item!r} is neither a class index below {len(folders)} nor a class "
                                f"name (e.g. {', '.join(list(names.values())[:3])})")
        return list(dict.fromkeys(chosen))
    if len(folders) <= MAX_SHOWN_CLASSES:
        return folders
    step = (len(folders) - 1) / (SUBSET_CLASSES - 1)
    return [folders[round(i * step)] for i in range(SUBSET_CLASSES)]


def grid_scale(side: int) -> int:
    """Integer nearest-neighbour factor that brings a ``side``-pixel image to at least GRID_TILE."""
    return max(1, math.ceil(GRID_TILE / side))


def write_grid(files: list[Path], channels: int, target: Path) -> dict:
    """One class's images in a grid (torchvision make_grid/save_image), upscaled without smoothing.

    Returns the layout a reader needs to find image i again: tile i sits at row i // nrow,
    column i % nrow, its top-left corner at (padding + row * (H*scale + padding),
    padding + column * (W*scale + padding)).
    """
    from torchvision.utils import make_grid, save_image

    from .data import decode_file

    images = torch.stack([decode_file(str(path), channels) for path in files])
    scale = grid_scale(max(images.shape[-2:]))
    big = images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1).float() / 255
    nrow = min(GRID_COLUMNS, len(files))
    save_image(make_grid(big, nrow=nrow, padding=GRID_PADDING, pad_value=1.0), target)
    return {"png": target.name, "files": [str(path) for path in files], "scale": scale, "nrow": nrow,
            "padding": GRID_PADDING, "tile": list(big.shape[-2:])}


def overview_figure(grids: dict[str, list[tuple[str, Path]]]):
    """All shown classes of every set in one picture (the README's): a column per set, a row per
    class labelled with its name, pixels drawn without smoothing."""
    import numpy as np
    from PIL import Image

    plt = pyplot()
    columns = list(grids)
    pictures = {name: [np.asarray(Image.open(path).convert("RGB")) for _, path in rows] for name, rows in grids.items()}
    stacked = {name: np.concatenate(parts, axis=0) for name, parts in pictures.items()}
    height = max(image.shape[0] for image in stacked.values())
    width = sum(image.shape[1] for image in stacked.values())
    figure, axes = plt.subplots(1, len(columns), figsize=((width + 160 * len(columns)) / 100, (height + 60) / 100),
                                squeeze=False)
    for axis, name in zip(axes[0], columns):
        axis.imshow(stacked[name], interpolation="nearest")
        offsets = np.cumsum([0] + [part.shape[0] for part in pictures[name]])
        axis.set_yticks((offsets[:-1] + offsets[1:]) / 2, [label for label, _ in grids[name]], fontsize=11)
        axis.set_xticks([])
        axis.set_title(name, fontsize=13)
        for side in axis.spines.values():
            side.set_visible(False)
    figure.tight_layout()
    return figure


def distilled_section(page: Page, workdir: WorkDir, classes: str | None, compare: list) -> dict[str, str]:
    """Grids per class for each image set; returns folder -> class name (the other sections' labels)."""
    from .data import distilled_listing

    page.heading("The distilled images")
    sets = image_sets(workdir, compare)
    if not sets:
        page.lack(f"distilled images ({workdir.distilled})", "run `lpld recover` (or `lpld run`)")
        return {}
    listings = {}
    for s in list(sets):
        try:
            listings[s.name] = distilled_listing(s.path)
        except UserError as error:  # e.g. an interrupted recover: say so, show the other sets
            page.lack(f"a complete image set in {s.path} ({error})", "finish it with `lpld recover`")
            sets.remove(s)
    if not sets:
        return {}
    main = sets[0]
    folders = list(listings[main.name])
    names = class_names(main.manifest, folders)
    shown = choose_classes(folders, names, classes)
    recorded, overview = [], {}
    for s in sets:
        channels = s.manifest.get("recipe", {}).get("data", {}).get("channels", 3)
        tag = re.sub(r"[^a-z0-9]+", "-", s.name.lower()).strip("-")
        for folder in shown:
            files = listings[s.name].get(folder, [])[:MAX_SHOWN_IMAGES]
            if not files:
                continue
            layout = write_grid([s.path / folder / f.name for f in files], channels, page.folder / f"grid-{tag}-{folder}.png")
            recorded.append({"set": s.name, "folder": folder, "class": names[folder], **layout})
            overview.setdefault(s.name, []).append((names[folder], page.folder / layout["png"]))
    scale = recorded[0]["scale"] if recorded else 1
    ipc = main.manifest.get("ipc")
    page.text(f"{len(folders)} classes, {ipc or len(listings[main.name][folders[0]])} images per class, from "
              f"{', '.join(f'{s.name} ({s.path})' for s in sets)}. Native resolution shown {scale}x, nearest "
              "neighbour (no smoothing).")
    if len(shown) < len(folders):
        page.text(f"Showing {len(shown)} of {len(folders)} classes; choose others with "
                  "`lpld report --classes 0,17,Bag`.", note=True)
    if len(sets) == 1:
        page.text("Only one batching found. To compare with SRe2L's across-class synthesis, recover into a "
                  "sibling work directory (copy teacher.safetensors there) with `lpld recover --batching "
                  "across-class --workdir RUN-across-class`, or pass `--compare DIR`.", note=True)
    rows = []
    for folder in shown:
        cells = {r["set"]: Picture(r["png"], f"{r['set']}: {r['class']}", pixels=True)
                 for r in recorded if r["folder"] == folder}
        rows.append([names[folder], *(cells.get(s.name, "-") for s in sets)])
    page.table(["class", *(s.name for s in sets)], rows)
    page.save("distilled.png", overview_figure(overview))
    page.text("The same grids in one picture: `distilled.png`.", note=True)
    page.data["distilled"] = {"sets": [{"name": s.name, "path": str(s.path)} for s in sets], "grids": recorded,
                              "overview": "distilled.png"}
    return names

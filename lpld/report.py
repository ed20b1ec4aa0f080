"""``lpld report``: one page per work directory, for a person to look at.

``WORKDIR/report/`` holds ``index.html`` (inline CSS, relative ``<img>`` links: it opens from disk
with no server and no network), the same content as ``report.md``, the PNGs, and ``report.json``
with every series exactly as it was drawn, so a test (or a reader) can check a plot against the
summary it came from. Sections, in the order people look at them: the distilled images (a grid per
class, beside an across-class run when one is found), accuracy against label bytes (with the
paper's headline points for the ImageNet recipes), within-class diversity, stage times and
accuracies, training curves. A piece the work directory lacks is named under "Missing" with the
command that makes it; nothing missing is an error, only a work directory that does not exist.

``Page`` and ``pyplot`` also serve ``benchmarks/report.py``.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .workdir import WorkDir

GRID_TILE = 56  # upscale distilled images by an integer factor to at least this many pixels per side
GRID_PADDING = 2
GRID_COLUMNS = 10
MAX_SHOWN_CLASSES = 20  # more classes than this: show an evenly spread subset (choose with --classes)
SUBSET_CLASSES = 10
MAX_SHOWN_IMAGES = 50  # per class and set

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 16px auto; max-width: 1500px;
       padding: 0 8px; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 26px; } h2 { font-size: 21px; border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 36px; }
table { border-collapse: collapse; margin: 10px 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: middle; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.picture { text-align: left; padding: 1px; line-height: 0; }
img { max-width: 100%; } .scroll { overflow-x: auto; }
img.pixels { image-rendering: pixelated; max-width: none; }
.missing { background: #fff4d6; border: 1px solid #e0c060; padding: 8px 14px; }
.note { color: #555; font-size: 14px; }
code { background: #f4f4f4; padding: 1px 4px; }
"""


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), imported only when drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class Picture:
    """An image cell of a table: ``file`` relative to the page; ``pixels`` keeps it unsmoothed."""

    file: str
    alt: str
    pixels: bool = False


class Page:
    """A page written as index.html and report.md side by side, with its PNGs and report.json."""

    def __init__(self, folder: Path, title: str):
        self.folder, self.title = Path(folder), title
        self.folder.mkdir(parents=True, exist_ok=True)
        self.html: list[str] = []
        self.md: list[str] = []
        self.data: dict = {}
        self.missing: list[str] = []

    def heading(self, text: str) -> None:
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md.append(f"## {text}")

    def text(self, text: str, note: bool = False) -> None:
        """A paragraph; `backticks` become code in both forms."""
        escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
        self.html.append(f"<p class=\"note\">{escaped}</p>" if note else f"<p>{escaped}</p>")
        self.md.append(f"*{text}*" if note else text)

    def lack(self, what: str, how: str) -> None:
        """Say in place that a piece is missing and how to make it; also listed at the top."""
        self.missing.append(f"{what}: {how}")
        how = how[:1].upper() + how[1:]
        self.html.append(f"<p class=\"missing\">Missing: {html.escape(what)}. {_code(how)}.</p>")
        self.md.append(f"> Missing: {what}. {how}.")

    def table(self, header: list[str], rows: list[list]) -> None:
        """Cells are text or ``Picture``; numbers should come formatted."""
        def html_cell(cell, tag):
            if isinstance(cell, Picture):
                css = " class=\"pixels\"" if cell.pixels else ""
                return f"<{tag} class=\"picture\"><img{css} src=\"{html.escape(cell.file)}\" alt=\"{html.escape(cell.alt)}\"></{tag}>"
            css = ' class="num"' if tag == "td" and re.match(r"[-+]?[0-9]", str(cell)) else ""
            return f"<{tag}{css}>{html.escape(str(cell))}</{tag}>"

        def md_cell(cell):
            text = f"![{cell.alt}]({cell.file})" if isinstance(cell, Picture) else str(cell)
            return text.replace("|", "\\|")

        lines = ["<div class=\"scroll\"><table>", "<tr>" + "".join(html_cell(cell, "th") for cell in header) + "</tr>"]
        lines += ["<tr>" + "".join(html_cell(cell, "td") for cell in row) + "</tr>" for row in rows]
        self.html.append("\n".join(lines + ["</table></div>"]))
        self.md.append("\n".join([f"| {' | '.join(md_cell(c) for c in header)} |",
                                  "|" + "---|" * len(header),
                                  *(f"| {' | '.join(md_cell(c) for c in row)} |" for row in rows)]))

    def image(self, file: str, alt: str) -> None:
        self.html.append(f"<p><img src=\"{html.escape(file)}\" alt=\"{html.escape(alt)}\"></p>")
        self.md.append(f"![{alt}]({file})")

    def save(self, file: str, figure) -> None:
        """Save a matplotlib figure as ``file`` beside the page (and free it)."""
        figure.savefig(self.folder / file, dpi=100, bbox_inches="tight")
        pyplot().close(figure)

    def figure(self, file: str, figure, alt: str) -> None:
        """Save a matplotlib figure beside the page and show it."""
        self.save(file, figure)
        self.image(file, alt)

    def write(self) -> Path:
        """index.html, report.md and report.json; returns index.html's path."""
        top_html, top_md = [f"<h1>{html.escape(self.title)}</h1>"], [f"# {self.title}"]
        if self.missing:
            items = "".join(f"<li>{_code(item)}</li>" for item in self.missing)
            top_html.append(f"<div class=\"missing\"><b>Missing from this work directory</b><ul>{items}</ul></div>")
            top_md.append("**Missing from this work directory**\n\n" + "\n".join(f"- {item}" for item in self.missing))
        self.data["missing"] = self.missing
        page = "\n".join(["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
                          f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>",
                          *top_html, *self.html, "</body></html>", ""])
        (self.folder / "index.html").write_text(page, encoding="utf-8")
        (self.folder / "report.md").write_text("\n\n".join(top_md + self.md) + "\n", encoding="utf-8")
        (self.folder / "report.json").write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        return self.folder / "index.html"


def _code(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def read_json(path: Path) -> dict | list | None:
    """The JSON at ``path``; None when it is missing or unreadable (the report says so, it never fails)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"


# ---------------------------------------------------------------- the distilled images

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


# ---------------------------------------------------------------- accuracy and label bytes

def students(workdir: WorkDir) -> tuple[list[dict], list[str]]:
    """Finished students' summaries (with the path they came from), and the unfinished ones' names."""
    from .train import SUMMARY

    finished, unfinished = [], []
    root = workdir.root / "students"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        summary = read_json(folder / SUMMARY)
        if isinstance(summary, dict) and summary.get("finished") and "top1" in summary:
            finished.append({**summary, "source": str(folder / SUMMARY)})
        elif folder.is_dir():
            unfinished.append(folder.name)
    return finished, unfinished


def accuracy_figure(series: dict):
    """top-1 against label bytes (log x): ours annotated with the compression factor, the paper's beside."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(10, 5.5))
    ours, paper = series["students"], series["paper"]
    xs = [p["label_bytes"] for p in ours + paper]
    low, high = min(xs), max(xs)
    middle = math.sqrt(low * high)

    def label(text, x, y, color, dy):  # right of the point in the left half, left of it in the right half
        right_half = x > middle
        axis.annotate(text, (x, y), textcoords="offset points", xytext=(-8 if right_half else 8, dy),
                      ha="right" if right_half else "left", fontsize=11, color=color)

    axis.scatter([p["label_bytes"] for p in ours], [p["top1"] for p in ours], s=60, color="tab:blue",
                 zorder=3, label="students of this run")
    for p in ours:
        label(f"{p['name']}: {p['compression_factor']:g}x, {format_bytes(p['label_bytes'])}, {p['top1']:.2f}%",
              p["label_bytes"], p["top1"], "black", 7)
    if paper:
        axis.scatter([p["label_bytes"] for p in paper], [p["top1"] for p in paper], s=60, marker="s",
                     color="tab:orange", zorder=3, label="paper (LPLD README)")
        for p in paper:
            label(f"{p['label']}, {p['top1']:g}%", p["label_bytes"], p["top1"], "tab:orange", -15)
    if series.get("teacher") is not None:
        axis.axhline(series["teacher"], color="gray", linestyle="--", label=f"teacher {series['teacher']:.2f}%")
    axis.set_xscale("log")
    axis.set_xlim(low / 4, high * 4)
    axis.set_xlabel("label bytes on disk (log scale)", fontsize=12)
    axis.set_ylabel("top-1 on the real validation split (%)", fontsize=12)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="lower right", fontsize=11)
    figure.tight_layout()
    return figure


def accuracy_section(page: Page, run_summary: dict | None, finished: list[dict], recipe: str | None,
                     ipc: int | None) -> None:
    from .recipes import PAPER_SOURCE, paper_points

    page.heading("Accuracy against label bytes")
    if not finished:
        page.lack("trained students (students/NAME/summary.json)", "run `lpld train` (or `lpld run`)")
        return
    series = {
        "students": [{key: s[key] for key in ("name", "label_bytes", "top1", "top5", "compression_factor", "source")}
                     for s in finished],
        "paper": paper_points(recipe, ipc),
        "teacher": run_summary["teacher"]["top1"] if run_summary and "teacher" in run_summary else None,
    }
    page.figure("accuracy.png", accuracy_figure(series), "top-1 against label bytes")
    if series["paper"]:
        page.text(f"Paper points: {PAPER_SOURCE}, at IPC {', '.join(sorted({str(p['ipc']) for p in series['paper']}))}.",
                  note=True)
    else:
        page.text(f"No paper points for recipe {recipe!r}: the paper's README reports ImageNet-1K, Tiny-ImageNet "
                  "and ImageNet-21K-P only.", note=True)
    page.data["accuracy"] = series


# ---------------------------------------------------------------- diversity

def diversity_figure(series: dict[str, dict], names: dict[str, str]):
    plt = pyplot()
    classes = list(dict.fromkeys(folder for result in series.values() for folder in result["per_class"]))
    width = 0.8 / max(len(series), 1)
    figure, axis = plt.subplots(figsize=(min(11, 0.3 * len(classes) * len(series) + 4), 5))
    for i, (name, result) in enumerate(series.items()):
        positions = [c + (i - (len(series) - 1) / 2) * width for c in range(len(classes))]
        values = [result["per_class"].get(folder, float("nan")) for folder in classes]
        axis.bar(positions, values, width, label=f"{name} (mean {result['mean_cosine']:.3f})")
    axis.set_xticks(range(len(classes)), [names.get(folder, folder) for folder in classes], rotation=30, ha="right",
                    fontsize=12)
    axis.set_ylabel("mean within-class cosine similarity", fontsize=12)
    low = min(v for result in series.values() for v in result["per_class"].values())
    axis.set_ylim(max(0.0, low - 0.1), 1.0)
    axis.legend(fontsize=11, ncol=len(series), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    axis.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def diversity_section(page: Page, workdir: WorkDir, names: dict[str, str]) -> None:
    page.heading("Within-class diversity")
    series = {}
    for path in sorted(workdir.analysis.glob("diversity-*.json")) if workdir.analysis.is_dir() else []:
        result = read_json(path)
        if isinstance(result, dict) and isinstance(result.get("per_class"), dict) and "mean_cosine" in result:
            series[result.get("name") or path.stem[len("diversity-"):]] = {
                "mean_cosine": result["mean_cosine"], "per_class": result["per_class"], "source": str(path)}
    order = ["class-wise", "across-class"]
    series = dict(sorted(series.items(), key=lambda item: (order.index(item[0]) if item[0] in order else 2, item[0])))
    if not series:
        page.lack("within-class diversity (analysis/diversity-*.json)",
                  f"run `lpld analyze diversity {workdir.distilled} --workdir {workdir.root}`, and the same on an "
                  "across-class set and on real images")
        return
    page.text("Mean cosine similarity between the teacher's penultimate features of two images of the same class "
              "(paper Table 1): lower means more diverse.")
    page.figure("diversity.png", diversity_figure(series, names), "within-class cosine similarity per class")
    page.table(["set", "mean within-class cosine", "classes"],
               [[name, f"{result['mean_cosine']:.4f}", len(result["per_class"])] for name, result in series.items()])
    if not {"class-wise", "across-class"} <= set(series):
        page.text("Class-wise and across-class results side by side make the paper's comparison; analyse the other "
                  "set with `lpld analyze diversity PATH --workdir` to add it.", note=True)
    page.data["diversity"] = series


def reproduce_section(page: Page, workdir: WorkDir) -> None:
    """The grids ``lpld reproduce`` left in the work directory: each one's plot and measured claims."""
    from . import reproduce

    folder = workdir.root / "reproduce"
    grids = [(path, read_json(path)) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    grids = [(path, result) for path, result in grids if isinstance(result, dict) and {"cells", "claims"} <= result.keys()]
    if not grids:
        return
    page.heading("Class-wise vs across-class batching under label compression")
    for path, result in grids:
        page.text(f"Grid `{path.stem}` ({path}), made by `{result.get('command') or 'lpld reproduce'}`: student top-1 "
                  "against the compression of the stored logits, mean and standard deviation over seeds.")
        page.figure(f"reproduce-{path.stem}.png", reproduce.figure(result), f"top-1 against label compression ({path.stem})")
        page.table(["IPC", "pruned", "class-wise - across-class", "seed spread", "class-wise drop from 1x",
                    "across-class drop from 1x"],
                   [[c["ipc"], f"{c['ratio']:g}", f"{c['class_wise_minus_across_class']:+.2f}", f"{c['seed_spread']:.2f}",
                     f"{c['drop_class_wise']:.2f}", f"{c['drop_across_class']:.2f}"] for c in result["claims"]])
    page.data["reproduce"] = {path.stem: result["claims"] for path, result in grids}


# ---------------------------------------------------------------- stages and accuracy tables

def stages_section(page: Page, run_summary: dict | None, finished: list[dict]) -> None:
    page.heading("Stages and accuracy")
    rows = []
    if run_summary and "teacher" in run_summary:
        rows.append(["teacher", f"{run_summary['teacher']['top1']:.2f}", f"{run_summary['teacher']['top5']:.2f}",
                     "", "", ""])
    rows += [[f"student {s['name']}", f"{s['top1']:.2f}", f"{s['top5']:.2f}", f"{s['label_bytes']:,d}",
              format_bytes(s["label_bytes"]), f"{s['compression_factor']:.1f}x"] for s in finished]
    if rows:
        page.table(["network", "top-1 %", "top-5 %", "label bytes", "size", "compression"], rows)
    if not run_summary or "stages" not in run_summary:
        page.lack("stage times and teacher accuracy (summary.json)", "written at the end of `lpld run`")
        return
    stage_rows = []
    for row in run_summary["stages"]:
        rate = "reused" if row.get("reused") else (
            f"{row['images_per_sec']:,.1f} {row.get('unit', 'img/s')}" if row.get("images_per_sec") else "-")
        stage_rows.append([row["stage"], f"{row['seconds']:,.1f}", rate])
    stage_rows.append(["total", f"{run_summary.get('wall_seconds', 0):,.1f}", ""])
    page.table(["stage", "seconds", "throughput"], stage_rows)
    page.data["stages"] = run_summary["stages"]


# ---------------------------------------------------------------- training curves

def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl lines that parse (a line cut by a crash is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def curves_figure(series: dict[str, dict]):
    plt = pyplot()
    figure, (loss_axis, top1_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, curve in series.items():
        loss_axis.plot(curve["epoch"], curve["loss"], label=name)
        top1_axis.plot(curve["eval_epoch"], curve["top1"], marker="o", label=name)
    loss_axis.set_yscale("log")
    loss_axis.set_xlabel("epoch", fontsize=12)
    loss_axis.set_ylabel("training loss (soft-label KL, log scale)", fontsize=12)
    top1_axis.set_xlabel("epoch", fontsize=12)
    top1_axis.set_ylabel("top-1 on the validation split (%)", fontsize=12)
    for axis in (loss_axis, top1_axis):
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=10)
    figure.tight_layout()
    return figure


def curves_section(page: Page, workdir: WorkDir) -> None:
    from .train import METRICS, format_loss

    page.heading("Training curves")
    root = workdir.root / "students"
    series = {}
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        rows = [row for row in read_metrics(folder / METRICS) if "epoch" in row and "loss" in row]
        if rows:
            evaluated = [row for row in rows if "top1" in row]
            series[folder.name] = {"epoch": [row["epoch"] for row in rows], "loss": [row["loss"] for row in rows],
                                   "eval_epoch": [row["epoch"] for row in evaluated],
                                   "top1": [row["top1"] for row in evaluated], "source": str(folder / METRICS)}
    if not series:
        page.lack("training curves (students/NAME/metrics.jsonl)", "written by `lpld train` after each epoch")
        return
    page.figure("curves.png", curves_figure(series), "training loss and top-1 per epoch")
    page.table(["student", "epochs", "first loss", "last loss", "last top-1 %"],
               [[name, len(curve["epoch"]), format_loss(curve["loss"][0]), format_loss(curve["loss"][-1]),
                 f"{curve['top1'][-1]:.2f}" if curve["top1"] else "-"] for name, curve in series.items()])
    page.data["curves"] = series


# ---------------------------------------------------------------- the command

def write_report(workdir: WorkDir, classes: str | None = None, compare: list = ()) -> Path:
    """Render WORKDIR/report/ from whatever the work directory holds; returns index.html's path."""
    root = workdir.root
    if not root.is_dir():
        raise UserError(f"work directory {root} does not exist"
                        + (" (it is a file)" if root.exists() else "") + "; pass --workdir pointing at a run "
                        "(e.g. runs/fmnist, made by `lpld run`)")
    run_summary = read_json(workdir.summary)
    run_summary = run_summary if isinstance(run_summary, dict) else None
    manifest = read_json(workdir.distilled / "manifest.json") or {}
    recipe = (run_summary or {}).get("recipe") or manifest.get("recipe", {}).get("name")
    page = Page(workdir.report, f"lpld report: {root}" + (f" (recipe {recipe})" if recipe else ""))
    finished, unfinished = students(workdir)
    names = distilled_section(page, workdir, classes, compare)
    accuracy_section(page, run_summary, finished, recipe, manifest.get("ipc"))
    diversity_section(page, workdir, names)
    reproduce_section(page, workdir)
    stages_section(page, run_summary, finished)
    for name in unfinished:
        page.lack(f"student {name} has not finished",
                  f"rerun `lpld run`, or `lpld train --resume --name {name} --labels LABELS`")
    curves_section(page, workdir)
    return page.write()


def _command(args: argparse.Namespace) -> None:
    path = write_report(WorkDir.for_recipe(args.workdir, args.recipe), args.classes, args.compare)
    print(f"report: {path}")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="write WORKDIR/report/index.html (+ report.md, PNGs): images, accuracy vs label bytes, "
                       "diversity, stages, training curves")
    parser.add_argument("--workdir", default=None, help="the run to report on (default runs/RECIPE)")
    parser.add_argument("--recipe", default="fmnist", help="names the default work directory runs/RECIPE")
    parser.add_argument("--classes", default=None, metavar="LIST",
                        help=f"comma-separated class indices or names to draw (default: every class up to "
                             f"{MAX_SHOWN_CLASSES}, else {SUBSET_CLASSES} spread over the range)")
    parser.add_argument("--compare", action="append", default=[], metavar="DIR",
                        help="another work directory (or image folder) to show beside this one, e.g. an "
                             "across-class run; sibling runs of the same recipe are found on their own")
    parser.set_defaults(func=_command)

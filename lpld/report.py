"""``lpld report``: one page per work directory, for a person to look at.

``WORKDIR/report/`` holds ``index.html`` (inline CSS, relative ``<img>`` links: it opens from disk
with no server and no network), the same content as ``report.md``, the PNGs, and ``report.json``
with every series exactly as it was drawn, so a test (or a reader) can check a plot against the
summary it came from. Sections, in the order people look at them: the distilled images (a grid per
class, beside an across-class run when one is found), accuracy against label bytes (with the
paper's headline points for the ImageNet recipes), within-class diversity, stage times and
accuracies, training curves. A piece the work directory lacks is named under "Missing" with the
command that makes it; nothing missing is an error, only a work directory that does not exist.

The page itself is ``page.Page``; the distilled images' section is ``report_images``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .errors import UserError
from .page import Page, format_bytes, pyplot, read_json
from .report_images import MAX_SHOWN_CLASSES, SUBSET_CLASSES, distilled_section
from .workdir import WorkDir

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

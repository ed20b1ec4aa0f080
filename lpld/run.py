"""``lpld run``: the whole pipeline in one work directory, resuming whatever an earlier run left.

squeeze -> stats -> recover -> diversity (of the distilled set and of as many real training images
per class, paper Table 1) -> relabel -> prune -> train (full labels, and pruned at recipe.prune.ratio)
-> eval -> report (WORKDIR/report/index.html, whose path it prints last).
Every stage skips or resumes on its own artifact, so rerunning the command after an interruption
continues where it stopped. The closing table puts the teacher's accuracy next to both students',
with the label bytes, the compression factor and each stage's throughput and wall time (also
written to ``WorkDir.summary``).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import distributed
from .codecs import LogitCodec
from .recipes import Recipe, add_recipe_arguments, recipe_from_args
from .workdir import WorkDir


@dataclass
class Stage:
    """One step of the chain: ``done`` says whether its artifact was complete before it ran."""

    name: str
    done: Callable[[], bool]
    work: Callable[[], object]
    images: Callable[[object], float | None]  # image passes of a full run, from what ``work`` returned
    unit: str = "img/s"


def _recover_complete(workdir: WorkDir) -> bool:
    manifest = workdir.distilled / "manifest.json"
    return manifest.is_file() and bool(json.loads(manifest.read_text()).get("complete"))


REAL_SET = "real"  # the name of the real images' series in the report's diversity section


def student_name(ratio: float) -> str:
    return f"r{ratio:g}"


def run(recipe: Recipe, workdir: WorkDir, device: torch.device | str | None = None) -> dict:
    """Run (or finish) every stage; return the summary also written to ``workdir.summary``."""
    from . import analyze, evaluate, labels, prune, recover, relabel, report, squeeze, stats, train

    wall_start = time.perf_counter()
    distributed.init(device)
    device = distributed.device(device)
    ratio = recipe.prune.ratio
    pruned = prune.pruned_path(workdir, ratio)
    store_done = {path: (lambda path=path: (path / "meta.json").is_file()) for path in (workdir.labels, pruned)}
    students = {student_name(0): workdir.labels, student_name(ratio): pruned}
    results: dict[str, dict] = {}

    def train_student(name):
        results[name] = train.train(recipe, workdir, students[name], name, device, resume=True)

    def prune_labels():
        if distributed.is_main():
            full = labels.LabelStore.open(workdir.labels)
            codec = LogitCodec(topk=recipe.prune.topk) if recipe.prune.topk else None
            prune.prune_store(full, pruned, ratio, recipe.prune.pool, recipe.prune.seed, codec)

    def measure_diversity():  # after recover: the distilled set is named by its manifest's batching
        distilled = analyze.set_name(workdir.distilled)
        if distributed.is_main() and not workdir.diversity(distilled).is_file():
            found = analyze.diversity(workdir.distilled, recipe, workdir.teacher, device)
            analyze.write_diversity(workdir, distilled, workdir.distilled, found)
        if distributed.is_main() and not workdir.diversity(REAL_SET).is_file():
            found = analyze.real_diversity(recipe, workdir.teacher, device, recipe.recover.ipc, workdir.listings)
            analyze.write_diversity(workdir, REAL_SET, f"{recipe.data.root} (train)", found)

    def diversity_done():
        return all(workdir.diversity(name).is_file() for name in (analyze.set_name(workdir.distilled), REAL_SET))

    relabel_images = recipe.relabel.epochs * (recipe.recover.ipc * recipe.data.num_classes
                                              // recipe.relabel.batch_size) * recipe.relabel.batch_size
    stages = [
        Stage("squeeze", workdir.teacher.is_file, lambda: squeeze.squeeze(recipe, workdir, device),
              lambda meta: recipe.squeeze.epochs * meta["train_images"] if "train_images" in meta else None),
        Stage("stats", workdir.stats.is_file, lambda: stats.stats(recipe, workdir, device),
              lambda result: result.meta["images"]),
        Stage("recover", lambda: _recover_complete(workdir), lambda: recover.recover(recipe, workdir, device),
              lambda _: recipe.data.num_classes * recipe.recover.ipc * recipe.recover.iterations, "img-steps/s"),
        Stage("diversity", diversity_done, measure_diversity, lambda _: 2 * recipe.data.num_classes * recipe.recover.ipc),
        Stage("relabel", store_done[workdir.labels], lambda: relabel.relabel(recipe, workdir, device),
              lambda _: relabel_images),
        Stage("prune", store_done[pruned], prune_labels, lambda _: None),
        *(Stage(f"train {name}", lambda name=name: (workdir.student(name) / train.SUMMARY).is_file(),
                lambda name=name: train_student(name), lambda _: None) for name in students),
    ]
    stage_rows = []
    for stage in stages:
        reused, start = stage.done(), time.perf_counter()
        result = stage.work()
        distributed.barrier()
        seconds = time.perf_counter() - start
        images = None if reused else stage.images(result)
        stage_rows.append({"stage": stage.name, "reused": reused, "seconds": seconds, "unit": stage.unit,
                       "images_per_sec": images / seconds if images else None})
    for row in stage_rows:
        if row["stage"].startswith("train ") and not row["reused"]:
            row["images_per_sec"] = results[row["stage"][len("train "):]]["images_per_sec"]

    start = time.perf_counter()
    teacher = evaluate.evaluate(evaluate.load_network(workdir.teacher, device), recipe.data, device,
                                dataset=evaluate.validation_set(recipe.data, workdir.listings))
    seconds = time.perf_counter() - start
    stage_rows.append({"stage": "eval teacher", "reused": False, "seconds": seconds, "unit": "img/s",
                   "images_per_sec": teacher["images"] / seconds})
    summary = {
        "recipe": recipe.name, "workdir": str(workdir.root), "wall_seconds": time.perf_counter() - wall_start,
        "teacher": {"top1": teacher["top1"], "top5": teacher["top5"]},
        "students": [{**results[name], "ratio": float(name[1:])} for name in students],
        "stages": stage_rows,
    }
    if distributed.is_main():
        workdir.summary.write_text(json.dumps(summary, indent=1))
        print(format_summary(summary))
        print(f"\nreport: {report.write_report(workdir)}")
    return summary


def format_summary(summary: dict) -> str:
    """The closing table: accuracy and label size per network, then time and throughput per stage."""
    lines = [f"lpld run {summary['recipe']} ({summary['workdir']})", "",
             f"{'network':24s} {'top-1':>7s} {'top-5':>7s} {'label bytes':>14s} {'compression':>11s}",
             f"{'teacher':24s} {summary['teacher']['top1']:7.2f} {summary['teacher']['top5']:7.2f}"]
    for student in summary["students"]:
        lines.append(f"{'student ' + student['name'] + ' (' + format(student['compression_factor'], 'g') + 'x)':24s} "
                     f"{student['top1']:7.2f} {student['top5']:7.2f} {student['label_bytes']:14,d} "
                     f"{student['compression_factor']:10.1f}x")
    lines += ["", f"{'stage':16s} {'seconds':>9s} {'throughput':>22s}"]
    for row in summary["stages"]:
        rate = "reused" if row["reused"] else (
            f"{row['images_per_sec']:.1f} {row['unit']}" if row["images_per_sec"] else "-")
        lines.append(f"{row['stage']:16s} {row['seconds']:9.1f} {rate:>22s}")
    lines.append(f"{'total':16s} {summary['wall_seconds']:9.1f}")
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> None:
    recipe = recipe_from_args(args)
    run(recipe, WorkDir.for_recipe(args.workdir, recipe.name), args.device)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run", help="the whole pipeline (squeeze, stats, recover, relabel, prune, train at 1x and the prune "
                    "ratio, eval) in one work directory, resuming what exists")
    add_recipe_arguments(parser)
    parser.set_defaults(func=_command)

"""``lpld reproduce``: the paper's central comparison as one seeded, resumable grid.

Table 1 / 6a of the paper: class-wise batching (LPLD) keeps its accuracy under heavy random label
pruning where across-class batching (SRe2L) does not, because it raises within-class diversity.
One teacher and its class-wise statistics (made here when the work directory has none) serve a
grid of image sets (batching x IPC), each recovered, analysed for diversity and relabelled once
at the recipe's label epochs (300, as the paper's, so every pruning ratio keeps the paper's labels
per image); every set's label store is pruned at each ratio (and re-encoded by the logit codecs
of the storage frontier), and a student is trained per (set, labels, seed) for its IPC's student
epochs and evaluated on the real test split. The seed is the student's: its initialization and
its training plan (which kept records each epoch replays); the paper's random pool keeps the same
records for every seed. Student folders are named by their epochs, so a grid with longer
students on the same work directory reuses the sets and trains beside the shorter ones. A second
axis, the training method, trains students of the same cells the LPQLD way (``--methods lpld
lpqld``: its teacher temperature schedule and calibrated student, ``recipes.LPQLD_TRAINING``) on the
same images and label stores.

Students run in ``--jobs`` worker processes with one torch thread each, so a 2-core machine trains
two at once. Every piece resumes on its own artifact (recover, relabel, prune and train all do),
so rerunning the command continues the grid. Results: ``WORKDIR/reproduce/NAME.json`` (top-1 mean
and standard deviation per cell, label bytes, compression, diversity), ``NAME.md`` (the table) and
``NAME.png`` (top-1 against compression, one line per batching and IPC, seed spread as error bars).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm import tqdm

from .codecs import LogitCodec
from .errors import UserError
from .page import pyplot
from .recipes import LPQLD_TRAINING, Recipe, add_recipe_arguments, recipe_from_args
from .workdir import WorkDir

BATCHINGS = ("class-wise", "across-class")
METHODS = ("lpld", "lpqld")  # how the students train: LPLD's fixed temperature, or LPQLD's schedule + calibration
PAPER_RATIOS = (0.0, 0.9, 0.95, 0.975, 0.99)
# Storage beyond pruning (LPQLD-style top-k, quantized values), measured at the smallest IPC. With
# K = 10 classes, per-sample fp16 logits are 20 bytes: int8 14, fp8 10, top-2 fp16 6, top-2 fp8 4.
FRONTIER = ("0.975:int8", "0.975:fp8", "0.975:top2-fp16", "0.975:top2-fp8", "0.99:top2-fp8")


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a set's labels pruned at ``ratio`` and kept by ``codec``."""

    batching: str
    ipc: int
    ratio: float
    codec: str = "fp16"
    method: str = "lpld"

    @property
    def labels(self) -> str:
        return f"labels-r{self.ratio:g}" + ("" if self.codec == "fp16" else f"-{self.codec}")


@dataclass(frozen=True)
class Grid:
    ipcs: tuple[int, ...] = (10, 50)
    epochs: tuple[int, ...] = (100, 20)  # student epochs per IPC: 400 steps of 25 images each (see docs/reproduce.md)
    ratios: tuple[float, ...] = PAPER_RATIOS
    frontier: tuple[str, ...] = FRONTIER  # "ratio:codec" cells at the smallest IPC
    seeds: int = 3
    batchings: tuple[str, ...] = BATCHINGS
    methods: tuple[str, ...] = ("lpld",)
    cells: list[Cell] = field(default_factory=list, compare=False)

    def __post_init__(self):
        if len(self.epochs) != len(self.ipcs):
            raise UserError(f"--epochs needs one value per IPC ({len(self.ipcs)}), got {len(self.epochs)}")
        for item in self.frontier:
            ratio, _, codec = item.partition(":")
            try:
                float(ratio), LogitCodec.parse(codec)
            except ValueError:
                raise UserError(f"--frontier {item!r}: expected RATIO:CODEC, e.g. 0.975:top2-fp8") from None
        unknown = sorted(set(self.batchings) - set(BATCHINGS)) + sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise UserError(f"unknown batching or method {unknown}: batchings {BATCHINGS}, methods {METHODS}")
        cells = [Cell(b, ipc, r, method=m) for m in self.methods for ipc in self.ipcs for b in self.batchings
                 for r in self.ratios]
        cells += [Cell(b, min(self.ipcs), float(item.split(":")[0]), item.split(":")[1], m)
                  for m in self.methods for b in self.batchings for item in self.frontier]
        self.cells.extend(dict.fromkeys(cells))  # a frontier cell may repeat a pruning cell: one student folder each

    def epochs_of(self, ipc: int) -> int:
        return self.epochs[self.ipcs.index(ipc)]

    def student(self, cell: Cell, seed: int) -> str:
        """The student folder of (cell, seed): its labels, its IPC's epochs and its seed."""
        method = "" if cell.method == "lpld" else f"-{cell.method}"
        return f"{cell.labels.removeprefix('labels-')}-e{self.epochs_of(cell.ipc)}-s{seed}{method}"


def set_recipe(recipe: Recipe, grid: Grid, batching: str, ipc: int) -> Recipe:
    """The recipe of one image set: its batching and IPC, students at the IPC's epochs, evaluated
    once at the end (labels at the recipe's relabel epochs)."""
    epochs = grid.epochs_of(ipc)
    return recipe.with_overrides([f"recover.batching={batching}", f"recover.ipc={ipc}",
                                  f"train.epochs={epochs}", f"train.val_interval={epochs}"])


def set_workdir(root: WorkDir, batching: str, ipc: int) -> WorkDir:
    """A set's own work directory, sharing the root's teacher and statistics through symlinks."""
    workdir = WorkDir(root.root / "reproduce" / f"{batching}-ipc{ipc}")
    workdir.root.mkdir(parents=True, exist_ok=True)
    for shared in (root.teacher, root.stats):
        link = workdir.root / shared.name
        if not link.exists():
            link.symlink_to(os.path.relpath(shared, workdir.root))
    return workdir


def prepare_set(recipe: Recipe, root: WorkDir, grid: Grid, batching: str, ipc: int, device: str) -> dict:
    """Recover, analyse, relabel and prune one image set; returns its diversity."""
    from . import analyze, labels, prune, recover, relabel

    workdir = set_workdir(root, batching, ipc)
    recipe = set_recipe(recipe, grid, batching, ipc)
    recover.recover(recipe, workdir, device, show_progress=False)
    report = analyze.diversity(workdir.distilled, recipe, workdir.teacher, device)
    analyze.write_diversity(workdir, analyze.set_name(workdir.distilled), workdir.distilled, report)
    relabel.relabel(recipe, workdir, device)
    full = labels.LabelStore.open(workdir.labels)
    for cell in grid.cells:
        if (cell.batching, cell.ipc) == (batching, ipc):
            prune.prune_store(full, workdir.root / cell.labels, cell.ratio, recipe.prune.pool, recipe.prune.seed,
                              LogitCodec.parse(cell.codec))
    return {"batching": batching, "ipc": ipc, **report.to_dict()}


def train_student(recipe: Recipe, root: WorkDir, grid: Grid, cell: Cell, seed: int, device: str) -> dict:
    """One student of one cell (resumes, or returns the finished one's summary)."""
    from . import labels, train

    workdir = set_workdir(root, cell.batching, cell.ipc)
    method = list(LPQLD_TRAINING) if cell.method == "lpqld" else []
    recipe = set_recipe(recipe, grid, cell.batching, cell.ipc).with_overrides([*method, f"train.seed={seed}"])
    summary = train.train(recipe, workdir, workdir.root / cell.labels, grid.student(cell, seed), device, resume=True)
    storage = labels.storage_report(labels.LabelStore.open(workdir.root / cell.labels, verify_checksums=False))
    return {**asdict(cell), "seed": seed, "top1": summary["top1"], "top5": summary["top5"],
            "logit_bytes": storage["logit_bytes"], "bytes_on_disk": storage["bytes_on_disk"],
            "compression": storage["logit_compression"], "records": storage["records"],
            "seconds": summary["wall_seconds"]}


def _in_worker(log: Path, function, *args):
    """Run one task in a worker: one torch thread, its output in ``log`` (the grid owns the screen)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        return function(*args)


def _worker_setup(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["TQDM_DISABLE"] = "1"


def run_grid(recipe: Recipe, root: WorkDir, grid: Grid, jobs: int = 2, name: str = "grid", device: str = "cpu",
             command: str | None = None) -> dict:
    """Every set, then every student, ``jobs`` at a time on ``device``; writes and returns the results."""
    from . import squeeze, stats

    start = time.perf_counter()
    if not root.teacher.is_file():
        squeeze.squeeze(recipe, root, device)
    if not root.stats.is_file():
        stats.stats(recipe, root, device)
    logs = root.root / "reproduce" / "logs"
    sets = [(b, ipc) for ipc in grid.ipcs for b in grid.batchings]
    students = {key: [(cell, seed) for cell in grid.cells if (cell.batching, cell.ipc) == key for seed in range(grid.seeds)]
                for key in sets}
    diversity, rows = {}, []
    bar = tqdm(total=len(sets) + sum(map(len, students.values())), unit="task", desc=f"reproduce {name}")
    context = get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_setup, initargs=(1,)) as pool:
        pending = {pool.submit(_in_worker, logs / f"{b}-ipc{ipc}.log", prepare_set, recipe, root, grid, b, ipc, device):
                   ("set", (b, ipc)) for b, ipc in sets}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind, key = pending.pop(future)
                result = future.result()
                bar.update()
                if kind == "set":
                    diversity[key] = result
                    bar.set_postfix_str(f"{key[0]} IPC {key[1]}: within-class cosine {result['mean_cosine']:.3f}")
                    for cell, seed in students[key]:
                        log = logs / f"{cell.batching}-ipc{cell.ipc}-{grid.student(cell, seed)}.log"
                        pending[pool.submit(_in_worker, log, train_student, recipe, root, grid, cell, seed, device)] = \
                            ("student", (cell, seed))
                else:
                    rows.append(result)
                    bar.set_postfix_str(f"{key[0].batching} IPC {key[0].ipc} {grid.student(*key)}: "
                                        f"{result['top1']:.2f}%")
    bar.close()
    results = summarize(grid, list(diversity.values()), rows)
    results.update(recipe=recipe.name, wall_seconds=time.perf_counter() - start, jobs=jobs, command=command,
                   machine={"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "torch": torch.__version__, "threads_per_job": 1})
    write_results(root.root / "reproduce" / name, results)
    return results


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(grid: Grid, sets: list[dict], rows: list[dict]) -> dict:
    """Mean and standard deviation of top-1 per cell, and the paper's two claims per IPC, measured."""
    cells = []
    for cell in grid.cells:
        mine = sorted((r for r in rows if (r["batching"], r["ipc"], r["ratio"], r["codec"], r.get("method", "lpld")) ==
                       (cell.batching, cell.ipc, cell.ratio, cell.codec, cell.method)), key=lambda r: r["seed"])
        if not mine:
            continue
        top1 = [r["top1"] for r in mine]
        cells.append({**asdict(cell), "top1": top1, "mean": statistics.fmean(top1), "std": _spread(top1),
                      **{key: mine[0][key] for key in ("logit_bytes", "bytes_on_disk", "compression", "records")}})
    claims = []
    for ipc in grid.ipcs:
        of = {(c["batching"], c["ratio"]): c for c in cells if c["ipc"] == ipc and c["codec"] == "fp16"
              and c["method"] == "lpld"}
        for ratio in (r for r in grid.ratios if r != 0):  # each against 1x (no claim without a 0 ratio)
            pairs = [of.get((b, r)) for b in BATCHINGS for r in (0.0, ratio)]
            if None in pairs:
                continue
            lpld_full, lpld_pruned, sre2l_full, sre2l_pruned = pairs
            margin = lpld_pruned["mean"] - sre2l_pruned["mean"]
            spread = max(lpld_pruned["std"], sre2l_pruned["std"])
            drop_lpld, drop_sre2l = lpld_full["mean"] - lpld_pruned["mean"], sre2l_full["mean"] - sre2l_pruned["mean"]
            claims.append({"ipc": ipc, "ratio": ratio, "class_wise_minus_across_class": margin, "seed_spread": spread,
                           "class_wise_ahead_beyond_spread": margin > spread,
                           "drop_class_wise": drop_lpld, "drop_across_class": drop_sre2l,
                           "class_wise_drops_less": drop_lpld < drop_sre2l})
    return {"grid": {key: value for key, value in asdict(grid).items() if key != "cells"},
            "sets": sets, "cells": cells, "claims": claims, "method_claims": method_claims(cells)}


def method_claims(cells: list[dict]) -> list[dict]:
    """Per cell trained both ways: LPQLD's training minus LPLD's, against the larger seed spread."""
    by_key = {(c["batching"], c["ipc"], c["ratio"], c["codec"], c["method"]): c for c in cells}
    claims = []
    for (batching, ipc, ratio, codec, method), lpqld in by_key.items():
        lpld = by_key.get((batching, ipc, ratio, codec, "lpld"))
        if method != "lpqld" or lpld is None:
            continue
        margin, spread = lpqld["mean"] - lpld["mean"], max(lpqld["std"], lpld["std"])
        claims.append({"batching": batching, "ipc": ipc, "ratio": ratio, "codec": codec, "compression": lpld["compression"],
                       "lpqld_minus_lpld": margin, "seed_spread": spread, "lpqld_ahead_beyond_spread": margin > spread,
                       "lpld_behind_beyond_spread": -margin > spread})
    return claims


def format_table(results: dict) -> str:
    """Markdown: one row per cell, then the claims."""
    diversity = {(s["batching"], s["ipc"]): s["mean_cosine"] for s in results["sets"]}
    lines = ["| IPC | batching | training | within-class cosine | ratio | logits as | compression | logit bytes | "
             "top-1 (mean +- sd) | seeds |", "|---:|---|---|---:|---:|---|---:|---:|---:|---|"]
    for c in results["cells"]:
        lines.append(f"| {c['ipc']} | {c['batching']} | {c.get('method', 'lpld')} | "
                     f"{diversity.get((c['batching'], c['ipc']), float('nan')):.3f} | "
                     f"{c['ratio']:g} | {c['codec']} | {c['compression']:.4g}x | {c['logit_bytes']:,d} | "
                     f"{c['mean']:.2f} +- {c['std']:.2f} | {', '.join(f'{v:.2f}' for v in c['top1'])} |")
    if results["claims"]:
        lines += ["", "| IPC | pruned | class-wise - across-class at that ratio | seed spread | ahead beyond spread | "
                  "drop from 1x: class-wise | across-class | class-wise drops less |", "|---:|---:|---:|---:|---|---:|---:|---|"]
    for c in results["claims"]:
        lines.append(f"| {c['ipc']} | {c['ratio']:g} | {c['class_wise_minus_across_class']:+.2f} | {c['seed_spread']:.2f} | "
                     f"{'yes' if c['class_wise_ahead_beyond_spread'] else 'no'} | {c['drop_class_wise']:.2f} | "
                     f"{c['drop_across_class']:.2f} | {'yes' if c['class_wise_drops_less'] else 'no'} |")
    if results.get("method_claims"):
        lines += ["", "| IPC | batching | pruned | logits as | compression | LPQLD - LPLD training | seed spread | "
                  "beyond spread |", "|---:|---|---:|---|---:|---:|---:|---|"]
        for c in results["method_claims"]:
            verdict = ("LPQLD ahead" if c["lpqld_ahead_beyond_spread"] else
                       "LPLD ahead" if c["lpld_behind_beyond_spread"] else "no")
            lines.append(f"| {c['ipc']} | {c['batching']} | {c['ratio']:g} | {c['codec']} | {c['compression']:.4g}x | "
                         f"{c['lpqld_minus_lpld']:+.2f} | {c['seed_spread']:.2f} | {verdict} |")
    return "\n".join(lines) + "\n"


def figure(results: dict):
    """Top-1 against logit compression (log x): a line per batching, training method and IPC over the
    pruning ratios (error bars: seed standard deviation), the codec cells as open markers."""
    drawing, axis = pyplot().subplots(figsize=(8, 5))
    colors = {("class-wise", "lpld"): "tab:blue", ("across-class", "lpld"): "tab:red",
              ("class-wise", "lpqld"): "tab:green", ("across-class", "lpqld"): "tab:orange"}
    cells = [dict(c, method=c.get("method", "lpld")) for c in results["cells"]]
    ipcs = sorted({c["ipc"] for c in cells})
    styles = dict(zip(ipcs, ("-", "--", ":", "-.")))
    named = set()  # each codec cell is named once, beside its higher point
    for batching, method in colors:
        which = f"{batching}{', LPQLD training' if method == 'lpqld' else ''}"
        mine = [c for c in cells if (c["batching"], c["method"]) == (batching, method)]
        for ipc in ipcs:
            line = sorted((c for c in mine if (c["ipc"], c["codec"]) == (ipc, "fp16")), key=lambda c: c["compression"])
            if line:
                axis.errorbar([c["compression"] for c in line], [c["mean"] for c in line], [c["std"] for c in line],
                              color=colors[batching, method], linestyle=styles[ipc], marker="o", capsize=3,
                              label=f"{which}, IPC {ipc}, pruning")
        coded = [c for c in mine if c["codec"] != "fp16"]
        if coded:
            axis.errorbar([c["compression"] for c in coded], [c["mean"] for c in coded], [c["std"] for c in coded],
                          color=colors[batching, method], linestyle="none", marker="s", mfc="white", capsize=3,
                          label=f"{which}, IPC {min(ipcs)}, pruning x codec")
            for c in coded:
                if (c["ratio"], c["codec"]) in named:
                    continue
                named.add((c["ratio"], c["codec"]))
                top = max((d["mean"] + d["std"] for d in cells
                           if (d["ratio"], d["codec"], d["ipc"]) == (c["ratio"], c["codec"], c["ipc"])))
                axis.annotate(f"r{c['ratio']:g} {c['codec']}", (c["compression"], top), fontsize=7, ha="center",
                              xytext=(0, 4), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("compression of the soft labels (full fp16 logits / stored logit bytes)")
    axis.set_ylabel("student top-1 on the test split (%)")
    methods = {c["method"] for c in cells}
    axis.set_title(f"{results['recipe']}: " + ("LPLD vs LPQLD training under label compression" if len(methods) > 1
                                               else "class-wise vs across-class batching under label compression"))
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8, loc="lower left")
    drawing.tight_layout()
    return drawing


def write_results(stem: Path, results: dict) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(format_table(results))
    picture = figure(results)
    picture.savefig(stem.with_suffix(".png"), dpi=120)
    pyplot().close(picture)
    print(format_table(results))
    print(f"reproduce: {stem.with_suffix('.json')}, {stem.with_suffix('.md')}, {stem.with_suffix('.png')} "
          f"({results['wall_seconds'] / 60:.1f} min)")


def _command(args: argparse.Namespace) -> None:
    from . import distributed

    if args.preset:
        raise UserError("lpld reproduce sets each student's training itself (--methods lpld lpqld); drop --preset")
    recipe = recipe_from_args(args)
    grid = Grid(tuple(args.ipc), tuple(args.epochs), tuple(args.ratios), tuple(args.frontier), args.seeds,
                tuple(args.batchings), tuple(args.methods))
    run_grid(recipe, WorkDir.for_recipe(args.workdir, recipe.name), grid, args.jobs, args.name,
             str(distributed.device(args.device)), shlex.join(["lpld", *sys.argv[1:]]))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="class-wise vs across-class batching over pruning ratios, label codecs, IPCs and seeds")
    add_recipe_arguments(parser)
    parser.add_argument("--ipc", type=int, nargs="+", default=list(Grid.ipcs), help="images per class of each set")
    parser.add_argument("--epochs", type=int, nargs="+", default=list(Grid.epochs),
                        help="student epochs, one per --ipc value (labels: the recipe's relabel.epochs)")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(PAPER_RATIOS), help="pruning ratios")
    parser.add_argument("--frontier", nargs="*", default=list(FRONTIER), metavar="RATIO:CODEC",
                        help="pruning x codec cells at the smallest IPC (codecs: fp16, int8, fp8, topK-<one of those>)")
    parser.add_argument("--seeds", type=int, default=3, help="students per cell (seeds 0..N-1)")
    parser.add_argument("--batchings", nargs="+", choices=BATCHINGS, default=list(BATCHINGS),
                        help="image sets to recover: class-wise (LPLD) and/or across-class (SRe2L)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["lpld"],
                        help="how the students train: lpld (the recipe's fixed temperature) and/or lpqld (its "
                             "teacher temperature schedule and calibrated student), on the same images and labels")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one torch thread each")
    parser.add_argument("--name", default="grid", help="results go to WORKDIR/reproduce/NAME.{json,md,png}")
    parser.set_defaults(func=_command)

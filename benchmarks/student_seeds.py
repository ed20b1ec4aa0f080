"""Students of one work directory under several training variants and seeds: top-1 mean and spread.

    python -m benchmarks.student_seeds --recipe fmnist --workdir runs/fmnist --labels runs/fmnist/labels \
        --variant fp32= --variant bf16=train.bf16=true --variant ghost-bn-8=train.bn_batch=8 --seeds 0 1 2

Each (variant, seed) trains ``lpld train`` student ``<variant>-s<seed>`` with ``train.seed`` = seed
(which also seeds the training plan) plus the variant's overrides, resuming what exists, and the
table of top-1 mean and standard deviation per variant is written to --out as JSON.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

from lpld import train
from lpld.recipes import get_recipe
from lpld.workdir import WorkDir

from .conftest import machine_info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fmnist")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=STAGE.FIELD=VALUE[,...]")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")
    args = parser.parse_args(argv)
    workdir = WorkDir.for_recipe(args.workdir, args.recipe)
    rows = {}
    for variant in args.variant:
        name, _, overrides = variant.partition("=")
        students = []
        for seed in args.seeds:
            recipe = get_recipe(args.recipe, [f"train.seed={seed}", *filter(None, overrides.split(","))])
            summary = train.train(recipe, workdir, args.labels, f"{name}-s{seed}", args.device, resume=True)
            students.append({"seed": seed, "top1": summary["top1"], "top5": summary["top5"],
                             "images_per_sec": summary["images_per_sec"]})
        top1 = [s["top1"] for s in students]
        rows[name] = {"overrides": overrides, "students": students, "top1_mean": statistics.mean(top1),
                      "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0}
        print(f"{name:14s} top-1 {rows[name]['top1_mean']:.2f} +- {rows[name]['top1_std']:.2f}  "
              f"({', '.join(f'{t:.2f}' for t in top1)})")
    document = {"command": "python -m benchmarks.student_seeds " + " ".join(sys.argv[1:] if argv is None else argv),
                "machine": machine_info(),
                "labels": args.labels, "variants": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

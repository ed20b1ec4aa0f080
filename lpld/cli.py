"""``lpld`` command line: parses arguments and calls the stage; nothing else happens here.

Each stage module owns its sub-command through ``register(subparsers)``, which adds the parser
and sets ``func``. A ``UserError`` is printed as one line (no traceback) and exits with 2.
"""
from __future__ import annotations

import argparse
import sys

from . import analyze, bank, evaluate, labels, prune, recover, relabel, report, run, squeeze, stats, train, upstream
from .errors import UserError

STAGES = (squeeze, stats, recover, relabel, prune, labels, train, evaluate, analyze, report, run, upstream, bank)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lpld", description="Soft-label pruning for large-scale dataset distillation (LPLD)."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        stage.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as error:
        print(f"lpld {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``lpld`` command line: parses arguments and calls the stage; nothing else happens here.

Each stage module owns its sub-command through ``register(subparsers)``, which adds the parser
and sets ``func``. A ``UserError`` is printed as one line (no traceback) and exits with 2; under
torchrun it is also published to the other ranks, which stop with the same message at their next
wait (``distributed.barrier``) instead of waiting out the process group's timeout.
"""
from __future__ import annotations

import argparse
import sys

from . import (analyze, bank, distributed, evaluate, labels, prune, recover, relabel, report, reproduce, run, squeeze,
               stats, train, upstream)
from .errors import UserError

STAGES = (squeeze, stats, recover, relabel, prune, labels, train, evaluate, analyze, report, run, reproduce, bank, upstream)


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
        distributed.publish_error(str(error))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

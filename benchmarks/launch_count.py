"""Kernel launches of the BN-matching loss, forward + backward, for ResNet-18's 20 BN layers.

Counted on the CPU: every Triton launch (each kernel is replaced by a counter that launches nothing,
so the interpreter's own tensor traffic stays out of the count) plus every leaf aten op the
profiler records, less the ops that only make views, allocate or return their input (they launch
nothing on a GPU). Two ways of calling the loss are counted:
``per_layer`` (one ``class_bn_loss`` per BN layer on that layer's gathered target rows, as recover
did before the grouped kernels) and ``all_layers`` (one ``class_bn_loss_layers`` call).

    python -m benchmarks.launch_count [--label NAME] [--out FILE]

adds a run to benchmarks/results/launches.json by default (the "before" run was made by this
file in a checkout of the commit before the grouped kernels, whose class_bn_loss it calls).
"""
import argparse
import collections
import functools
import json
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import torch
import triton

import lpld_kernels
from lpld_kernels import _dispatch, bn_match

RESULTS = Path(__file__).resolve().parent / "results" / "launches.json"
RESNET18_BN = [(64, 16)] + [(64, 8)] * 4 + [(128, 4)] * 5 + [(256, 2)] * 5 + [(512, 1)] * 5  # (C, side) at 32 px
NO_LAUNCH = {"empty", "empty_strided", "empty_like", "view", "as_strided", "_reshape_alias", "reshape", "unsqueeze",
             "squeeze", "expand", "permute", "transpose", "t", "slice", "select", "narrow", "split", "split_with_sizes",
             "unbind", "detach", "detach_", "alias", "lift_fresh", "resolve_conj", "resolve_neg", "_unsafe_view",
             "contiguous", "set_", "to", "resize_", "result_type", "scalar_tensor"}
# a leaf "to" (no _to_copy below it) returns its input; result_type and a Python scalar's tensor stay on the host


class _StandIn:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` calls
    ``on_launch(kernel, args, kwargs)`` and launches nothing."""

    def __init__(self, kernel, on_launch):
        self.kernel, self.on_launch = kernel, on_launch

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.on_launch(self.kernel, args, kwargs)


@contextmanager
def kernels_replaced(module, on_launch):
    """Every Triton kernel of ``module`` (a ``*_kernel`` name) replaced by a ``_StandIn``."""
    kernels = {name: value for name, value in vars(module).items()
               if type(value).__name__ in ("JITFunction", "InterpretedFunction") and name.endswith("_kernel")}
    with mock.patch.multiple(module, **{name: _StandIn(kernel, on_launch) for name, kernel in kernels.items()}):
        yield


def count_launches(step) -> dict:
    """Run ``step()`` twice, the second time under the profiler (the first builds the launch plans, as
    a first recover step does); launches of the second by name (Triton kernels and aten ops)."""
    counts = collections.Counter()
    def count(kernel, args, kwargs):
        counts[f"triton::{kernel.__name__}"] += 1

    with ExitStack() as stack:
        stack.enter_context(kernels_replaced(bn_match, count))
        # CPU tensors take the Triton path as under the interpreter, which the counters make unnecessary
        stack.enter_context(mock.patch.object(_dispatch, "triton_interpreted", lambda: True))
        step()
        counts.clear()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            step()

    def walk(event):
        children = [child for child in event.cpu_children if child.name.startswith("aten::")]
        if event.name.startswith("aten::") and not children and event.name.removeprefix("aten::") not in NO_LAUNCH:
            counts[event.name] += 1
        for child in event.cpu_children:
            walk(child)

    for event in profile.events():
        if event.cpu_parent is None:
            walk(event)
    return {"total": sum(counts.values()), "triton": sum(v for k, v in counts.items() if k.startswith("triton::")),
            "by_name": dict(sorted(counts.items()))}


def resnet18_step(call: str, batch: int = 4, classes: int = 2):
    """Forward + backward of the BN loss over ResNet-18's BN inputs (32 px, ``classes`` groups); callable
    again (each call builds a new graph)."""
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, c, side, side, generator=generator).requires_grad_() for c, side in RESNET18_BN]
    channels = [c for c, _ in RESNET18_BN]
    mean, var = torch.randn(10, sum(channels), generator=generator), torch.rand(10, sum(channels), generator=generator)
    groups = torch.arange(batch) * classes // batch
    rows = torch.tensor([3, 7][:classes])
    weights = [10.0] + [1.0] * (len(xs) - 1)
    if call == "all_layers":
        loss_fn = functools.partial(lpld_kernels.class_bn_loss_layers, xs, groups, mean, var, weights, rows,
                                    backend="triton")
    else:
        means, variances = mean.split(channels, 1), var.split(channels, 1)
        def loss_fn():
            return sum(w * lpld_kernels.class_bn_loss(x, groups, m[rows], v[rows], backend="triton")
                       for w, x, m, v in zip(weights, xs, means, variances))
    return lambda: torch.autograd.grad(loss_fn(), xs)  # as after zero_grad(set_to_none=True): no accumulation


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="current", help="key of this run in the file (e.g. the code's commit)")
    args = parser.parse_args(argv)
    calls = ["per_layer"] + (["all_layers"] if hasattr(lpld_kernels, "class_bn_loss_layers") else [])
    counts = {call: count_launches(resnet18_step(call)) for call in calls}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    document = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": {}}
    document["what"] = ("BN-matching loss forward + backward, ResNet-18's 20 BN layers (32 px, batch 4, 2 classes); "
                        "counted on the CPU: on CUDA the grouped op adds one pinned host-to-device copy of its "
                        "pointer table per pass (forward, backward)")
    document["runs"][args.label] = {
        "command": "python -m benchmarks.launch_count " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": commit, "triton": triton.__version__, "torch": torch.__version__, "launches": counts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    for call, count in counts.items():
        print(f"{args.label} {call:11s} {count['total']:5d} launches ({count['triton']} Triton)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

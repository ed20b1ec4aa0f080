"""Machine code for the GPUs users have, without a GPU: every Triton kernel variant the code launches.

The variants are not listed by hand: the real launch functions (``bn_match._triton_forward`` /
``_triton_backward``, ``kl_div._triton_forward``) run with each kernel replaced by a recorder, on
the BN input shapes and logit shapes of every recipe, in each dtype and layout the pipeline and
drop-in users pass. Each distinct (kernel, argument types, constexprs, num_warps) is then compiled
with Triton for sm_80, sm_90 and sm_100 (Triton ships ptxas), and ``cuobjdump`` reads the registers,
local memory (spills) and shared memory of the cubin.

    python -m benchmarks.compile_report [--arch 80 90 100] [--out FILE]

writes benchmarks/results/compile-report.json by default. Run it without TRITON_INTERPRET.
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

ARCHS = (80, 90, 100)
SMS = {80: 108, 90: 132, 100: 148}  # A100, H100, B200: the KL launch depends on the SM count
RESULTS = Path(__file__).resolve().parent / "results" / "compile-report.json"
BN_DTYPES = {"recipes": (torch.float32, torch.bfloat16), "drop-in": (torch.float16,)}
KL_DTYPES = [(torch.float32, torch.float16), (torch.bfloat16, torch.float16), (torch.float16, torch.float32)]
_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32", torch.bool: "i1"}


def recipe_shapes() -> dict[str, dict]:
    """Per recipe: the (C, H*W) of every BN input of its teacher, and the training logits [B, K]."""
    from lpld import models, recipes

    shapes = {}
    for name, recipe in sorted(recipes.RECIPES.items()):
        data = recipe.data
        model = models.build_model(recipe.model.arch, data.num_classes, data.channels, recipe.model.stem).eval()
        seen = []
        hooks = [bn.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
                 for _, bn in models.bn_layers(model)]
        with torch.no_grad():
            model(torch.zeros(1, data.channels, data.resolution, data.resolution))
        for hook in hooks:
            hook.remove()
        shapes[name] = {"bn": [(c, h * w) for _, c, h, w in seen],
                        "logits": (recipe.relabel.batch_size, data.num_classes)}
    return shapes


def _recorder(launches: list):
    """An ``on_launch`` for ``kernels_replaced`` that keeps (kernel, argument types, constexprs, warps)."""
    def record(kernel, args, kwargs):
        constexprs = dict(kwargs)
        num_warps = constexprs.pop("num_warps", 4)
        names = [p.name for p in kernel.params if not p.is_constexpr]
        launches.append((kernel, {name: _type_of(value) for name, value in zip(names, args)}, constexprs, num_warps))
    return record


def _at_element(x: torch.Tensor, start: int) -> torch.Tensor:
    """``x``'s shape and strides in memory that begins ``start`` elements past an aligned allocation."""
    return torch.empty(x.numel() + start, dtype=x.dtype)[start:].as_strided(x.shape, x.stride())


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2**31 else "i32"
    return "fp32"


def launched_variants(archs=ARCHS) -> list[dict]:
    """Every distinct kernel launch of the recipes' shapes (and the drop-in dtypes), with why."""
    from lpld_kernels import bn_match, kl_div

    from .launch_count import kernels_replaced

    launches: list = []
    why: dict = {}
    for recipe, shape in recipe_shapes().items():
        for use, dtypes in BN_DTYPES.items():
            for dtype, channels_last, start in itertools.product(dtypes, (False, True), (0, 1)):
                if start and dtype != torch.float32:
                    continue  # one dtype shows the variant for inputs off a vector boundary (a drop-in's views)
                memory_format = torch.channels_last if channels_last else torch.contiguous_format
                xs = [_at_element(torch.empty(1, c, hw, 1, dtype=dtype).contiguous(memory_format=memory_format), start)
                      for c, hw in shape["bn"]]
                groups = torch.zeros(1, dtype=torch.int64)
                table = torch.zeros(2, sum(c for c, _ in shape["bn"]))
                before = len(launches)
                with kernels_replaced(bn_match, _recorder(launches)):
                    for rows, rms in itertools.product((torch.zeros(1, dtype=torch.int64), None), (False, True)):
                        outputs = bn_match._triton_forward(xs, groups, table, table, rows, [1.0] * len(xs), rms)
                        bn_match._triton_backward(torch.ones(()), xs, groups, *outputs[1:], [1.0] * len(xs), rms)
                layout = "channels_last" if channels_last else "NCHW"
                for launch in launches[before:]:
                    why.setdefault(_key(launch), set()).add(
                        f"BN {recipe} {_TYPES[dtype]} {layout}{' off a vector boundary' if start else ''} ({use})")
        rows, classes = shape["logits"]
        for student_dtype, teacher_dtype in KL_DTYPES:
            for arch in archs:
                for need_grad in (True, False):
                    before = len(launches)
                    student = torch.empty(rows, classes, dtype=student_dtype)
                    with kernels_replaced(kl_div, _recorder(launches)), \
                            mock.patch.object(kl_div, "wanted_programs", lambda _device, arch=arch: 4 * SMS[arch]):
                        kl_div._triton_forward(student, torch.empty(rows, classes, dtype=teacher_dtype), 20.0, 1.0, 1.0,
                                               need_grad)
                    for launch in launches[before:]:
                        why.setdefault(_key(launch), set()).add(
                            f"KL {recipe} [{rows}, {classes}] {_TYPES[student_dtype]}/{_TYPES[teacher_dtype]} "
                            f"sm_{arch}{'' if need_grad else ' no grad'}")
    variants = {}
    for kernel, signature, constexprs, num_warps in launches:
        variants.setdefault(_key((kernel, signature, constexprs, num_warps)),
                            {"kernel": kernel, "signature": signature, "constexprs": constexprs,
                             "num_warps": num_warps})
    return [{**variant, "used_by": sorted(why[key])} for key, variant in variants.items()]


def _key(launch) -> str:
    kernel, signature, constexprs, num_warps = launch
    return json.dumps([kernel.__name__, signature, {k: str(v) for k, v in constexprs.items()}, num_warps])


def compile_variant(variant: dict, arch: int) -> dict:
    """Compile one variant for sm_<arch>; registers, spills and shared memory from its cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = variant["kernel"]
    signature = {p.name: "constexpr" if p.is_constexpr else variant["signature"][p.name] for p in kernel.params}
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=variant["constexprs"]),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": variant["num_warps"]})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    return {"registers": int(fields["REG"]), "spill_bytes": int(fields["LOCAL"]) + int(fields["STACK"]),
            "shared_bytes": int(fields["SHARED"]),
            # global loads / stores of 2-4 elements per instruction (ld.global.v4.b32 ...), in the PTX
            "vector_loads": len(re.findall(r"\bld\.global(?:\.[a-z0-9]+)*\.v[248]\.", ptx)),
            "vector_stores": len(re.findall(r"\bst\.global(?:\.[a-z0-9]+)*\.v[248]\.", ptx)),
            "seconds": round(time.perf_counter() - start, 2)}


def report(archs=ARCHS) -> dict:
    rows = []
    for variant in launched_variants(archs):
        row = {"kernel": variant["kernel"].__name__, "signature": variant["signature"],
               "constexprs": {k: str(v) for k, v in variant["constexprs"].items()},
               "num_warps": variant["num_warps"], "used_by": variant["used_by"]}
        row.update({f"sm_{arch}": compile_variant(variant, arch) for arch in archs})
        rows.append(row)
    import triton

    return {"command": "python -m benchmarks.compile_report " + " ".join(sys.argv[1:]), "triton": triton.__version__,
            "torch": torch.__version__, "archs": [f"sm_{a}" for a in archs], "variants": rows}


def format_table(document: dict) -> str:
    archs = document["archs"]
    lines = [f"{'kernel':22s} {'constexprs':58s} warps " + " ".join(f"{a + ' regs/spill':>16s}" for a in archs)]
    for row in document["variants"]:
        constexprs = ",".join(f"{k}={v}" for k, v in row["constexprs"].items())
        dtypes = "/".join(sorted({t for t in row["signature"].values() if t.startswith("*") and "i" not in t}))
        lines.append(f"{row['kernel']:22s} {constexprs + ' ' + dtypes:58.58s} {row['num_warps']:5d} " + " ".join(
            f"{row[a]['registers']:>10d}/{row[a]['spill_bytes']:<5d}" for a in archs))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
    document = report(tuple(args.arch))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(format_table(document))
    spilled = [row["kernel"] for row in document["variants"] for a in document["archs"] if row[a]["spill_bytes"]]
    print(f"{len(document['variants'])} variants x {len(args.arch)} targets; spills: {spilled or 'none'} -> {args.out}")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())

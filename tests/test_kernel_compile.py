"""Every Triton kernel variant the code launches compiles for sm_80, sm_90 and sm_100 without spills,
and the committed report (benchmarks/results/compile-report.json) lists exactly those variants.

The report runs in a child process without the interpreter (which replaces the kernels), so this
catches what the interpreter accepts but the compiler refuses; no GPU is needed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "compile-report.json"


def _variant_keys(document):
    return sorted(json.dumps([row["kernel"], row["signature"], row["constexprs"], row["num_warps"]])
                  for row in document["variants"])


def test_launched_variants_compile_without_spills(tmp_path):
    out = tmp_path / "compile-report.json"
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--out", str(out)], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    fresh = json.loads(out.read_text())
    assert fresh["archs"] == ["sm_80", "sm_90", "sm_100"]
    kernels = {row["kernel"] for row in fresh["variants"]}
    assert kernels == {"_moments_kernel", "_merge_kernel", "_finish_kernel", "_backward_kernel", "_log_sum_exp_kernel",
                       "_soft_kl_kernel"}
    for row in fresh["variants"]:
        for arch in fresh["archs"]:
            assert row[arch]["spill_bytes"] == 0 and 0 < row[arch]["registers"] <= 255, (row["kernel"], arch)
    # the aligned variant reads x (and writes dx) in 16-byte vectors; without the hints it never does
    x_passes = [row for row in fresh["variants"] if row["kernel"] in ("_moments_kernel", "_backward_kernel")]
    for row in x_passes:
        aligned = row["constexprs"]["VEC"] != "1"
        for arch in fresh["archs"]:
            assert (row[arch]["vector_loads"] > 0) == aligned, (row["kernel"], row["constexprs"], arch)
            if row["kernel"] == "_backward_kernel":
                assert (row[arch]["vector_stores"] > 0) == aligned, (row["constexprs"], arch)
    assert {row["constexprs"]["VEC"] for row in x_passes} == {"1", "4", "8"}
    assert _variant_keys(json.loads(COMMITTED.read_text())) == _variant_keys(fresh), (
        "the committed compile report is stale: rerun python -m benchmarks.compile_report")

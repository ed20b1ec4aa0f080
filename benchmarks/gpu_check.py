"""The GPU check: what one lent CUDA machine can prove about lpld, in one call of at most 8 minutes.

    python3 -m benchmarks.gpu_check [--out DIR] [--only STEP [STEP ...]]

Made for the machine our GPU checks run on (one H100/H200, its own Python with torch, torchvision
and triton but no nvidia-dali, no package registry, 10 minutes per command, only ``$OUT`` comes
back), and it runs on any CUDA machine. Nothing is installed: the checkout is imported as it lies
(``lpld`` from the tree, ``lpld_kernels`` through a link to ``kernels/``), with the torch it finds.

It first records the machine (``nvidia-smi``, versions, the device and whether a CUDA op runs),
then runs the steps below in order, each in a child process with its own time budget, going on
past a step that fails or runs out of time. Without a usable CUDA device every step skips with
the reason. Everything lands in ``$OUT`` when that is set, else in ``benchmarks/results/``:
``gpu-check-<machine>.json`` (what ran, passed, failed and skipped, per step and per test),
``gpu-check-<machine>.log`` (every step's output) and the benchmark JSONs ``<suite>-<machine>.json``:
five files, within the machine's eight. Test steps run on 8 pytest-xdist workers where xdist is
installed (Triton compiles each kernel variant on the CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAME = "gpu-check"
LOG_TAIL_BYTES = 400_000  # per step: the machine returns at most 16 MiB per file


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int
    argv: tuple[str, ...]  # after ``python -m``
    what: str
    parallel: bool = False  # tests that may spread over pytest-xdist workers


PYTEST = ("pytest", "-q", "-p", "no:cacheprovider", "--disable-warnings", "-o", "addopts=")
# 455 s of steps, at most 45 s of records (probe, nvidia-smi) around them: within the 10-minute command.
STEPS = (
    Step("kernel-tests", 100, PYTEST + ("tests/test_kernel_bn_match.py", "tests/test_kernel_kl_div.py"),
         "both kernel test files in full on CUDA: dtypes, layouts, odd shapes, hypothesis cases", parallel=True),
    Step("gpu-tests", 100, PYTEST + ("-m", "gpu", "tests"),
         "the gpu-marked tests: Triton inside torch.compile, recover's speed options, no host syncs", parallel=True),
    Step("kernel-bench", 90, PYTEST + ("benchmarks/test_bench_kernels.py",),
         "fused kernels vs eager and compiled references, timed between CUDA events"),
    Step("recover-bench", 75, PYTEST + ("benchmarks/test_bench_recover.py", "-k", "gpu"),
         "recover at 224 px (ResNet-18): batched vs one class at a time, eager vs compile+channels_last+bf16"),
    Step("train-bench", 90, PYTEST + ("benchmarks/test_bench_train.py",),
         "student training: torch replay vs resident tensors (DALI when installed)"),
)


def out_dir(requested: str | None) -> Path:
    """Absolute: the steps run from the checkout's root, wherever the check was started."""
    return Path(requested or os.environ.get("OUT") or ROOT / "benchmarks" / "results").resolve()


def child_environment(shim: Path, results: Path, cache: Path) -> dict:
    """The checkout on the import path (``lpld_kernels`` is ``kernels/`` under another name), results
    into ``results``, one compile cache for all steps, and no Triton interpreter."""
    link = shim / "lpld_kernels"
    if not link.exists():
        link.symlink_to(ROOT / "kernels", target_is_directory=True)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(shim), env.get("PYTHONPATH")]))
    env.update(LPLD_RESULTS_DIR=str(results), TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
               PYTHONDONTWRITEBYTECODE="1")
    return env


PROBE = """
import importlib.util, json, os, platform, torch, torchvision, triton, numpy, lpld, lpld_kernels
info = {"xdist": importlib.util.find_spec("xdist") is not None, "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "torchvision": torchvision.__version__, "triton": triton.__version__, "numpy": numpy.__version__,
        "lpld": os.path.realpath(lpld.__file__), "lpld_kernels": os.path.realpath(lpld_kernels.__file__),
        "cuda_available": torch.cuda.is_available()}
try:
    import nvidia.dali
    info["nvidia_dali"] = nvidia.dali.__version__
except ImportError:
    info["nvidia_dali"] = None
if info["cuda_available"]:
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, capability=f"sm_{props.major}{props.minor}", devices=torch.cuda.device_count(),
                memory_gib=round(props.total_memory / 2**30, 1))
    try:
        info["cuda_op"] = float((torch.ones(4, device="cuda") * 2).sum().item())
    except Exception as error:  # a driver older than the CUDA build fails here, not at is_available()
        info["cuda_error"] = repr(error)[:500]
print(json.dumps(info))
"""


def probe(env: dict, log) -> dict:
    """Versions, the device, and whether a CUDA op really runs (a driver older than the CUDA build fails here)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = {"host": platform.node(), "cores": cores, "commit": _commit()}
    smi = _run(["nvidia-smi"], env, 15)
    log.write(f"$ nvidia-smi\n{smi['output']}\n")
    machine["nvidia_smi"] = smi["output"].strip()[-3000:] if smi["rc"] == 0 else f"unavailable ({smi['output'][-300:].strip()})"
    versions = _run([sys.executable, "-c", PROBE], env, 30)
    log.write(f"$ python -c PROBE\n{versions['output']}\n")
    found = [line for line in versions["output"].splitlines() if line.startswith("{") and line.endswith("}")]
    try:  # the probe's JSON line, wherever warnings put it among the merged output
        machine.update(json.loads(found[-1]))
    except (ValueError, IndexError):
        machine["probe_error"] = versions["output"][-2000:]
        machine["cuda_available"] = False
    return machine


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _run(argv: list[str], env: dict, budget_s: float) -> dict:
    """Run ``argv`` in its own process group; past ``budget_s`` the whole group is killed."""
    start = time.monotonic()
    try:
        child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    except OSError as error:
        return {"rc": None, "output": str(error), "seconds": 0.0, "timed_out": False}
    try:
        output, _ = child.communicate(timeout=budget_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # the group may have ended at that very moment
            os.killpg(child.pid, signal.SIGKILL)
        output, _ = child.communicate()
        timed_out = True
    return {"rc": child.returncode, "output": output.decode(errors="replace"), "timed_out": timed_out,
            "seconds": round(time.monotonic() - start, 1)}


def junit_counts(path: Path) -> dict:
    """passed / failed / skipped counts, failing test ids with their first line, skip reasons."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    try:
        cases = list(ElementTree.parse(path).getroot().iter("testcase")) if path.is_file() else []
    except ElementTree.ParseError:  # cut short by the step's kill: the log still has the output
        cases, counts["junit"] = [], "unreadable (the step was killed while writing it)"
    for case in cases:
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if problem is not None:
            counts["failed"] += 1
            message = (problem.get("message") or "").strip()
            counts["failures"].append(f"{test}: {message.splitlines()[0][:300] if message else ''}")
        elif skipped is not None:
            counts["skipped"] += 1
            reason = (skipped.get("message") or "").strip()[:300]
            counts["skip_reasons"][reason] = counts["skip_reasons"].get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return counts


def no_cuda(machine: dict) -> str | None:
    """Why the steps cannot run here (None when a CUDA op ran)."""
    if "probe_error" in machine:
        return "the probe did not run (see probe_error): the steps would fail the same way"
    if not machine.get("cuda_available"):
        return "no CUDA device: torch.cuda.is_available() is False"
    if "cuda_op" not in machine:
        return f"CUDA is there but an op on it failed: {machine.get('cuda_error')}"
    return None


def run_step(step: Step, env: dict, scratch: Path, machine: dict, log) -> dict:
    """One step's record: status passed / failed / timed_out / skipped, seconds, test counts."""
    record = {"name": step.name, "what": step.what, "budget_s": step.budget_s}
    reason = no_cuda(machine)
    if reason:
        record.update(status="skipped", reason=reason)
        log.write(f"\n=== {step.name}: skipped ({reason})\n")
        return record
    junit = scratch / f"{step.name}.xml"
    workers = ["-n", "8"] if step.parallel and machine.get("xdist") else []
    argv = [sys.executable, "-m", *step.argv, *workers, f"--junitxml={junit}"]
    log.write(f"\n=== {step.name} (budget {step.budget_s} s): {' '.join(argv[1:])}\n")
    log.flush()
    result = _run(argv, env, step.budget_s)
    output = result["output"]
    if len(output) > LOG_TAIL_BYTES:
        output = f"[... {len(output) - LOG_TAIL_BYTES} characters cut ...]\n" + output[-LOG_TAIL_BYTES:]
    log.write(output)
    counts = junit_counts(junit)
    status = "timed_out" if result["timed_out"] else "passed" if result["rc"] == 0 else "failed"
    if status == "failed" and not counts["failed"] and result["rc"] == 5:
        status = "skipped"  # pytest's "no tests collected"
    record.update(status=status, rc=result["rc"], seconds=result["seconds"], tests=counts)
    log.write(f"=== {step.name}: {status} in {result['seconds']} s, rc {result['rc']}\n")
    log.flush()
    return record


def slug(machine: dict) -> str:
    """File-name tag, as ``benchmarks/conftest.machine_slug`` names the benchmark JSONs: the GPU's
    name, or cpu-<cores>c."""
    name = machine.get("device") or f"cpu-{machine.get('cores')}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def check(out: Path, only: list[str] | None = None, steps=STEPS) -> dict:
    """Run the check into ``out``; returns the summary (also written there, as ``summary["path"]``)."""
    unknown = sorted(set(only or []) - {step.name for step in steps})
    if unknown:
        raise SystemExit(f"unknown step(s) {unknown}: choose from {[step.name for step in steps]}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    summary = {"check": "lpld GPU check", "command": " ".join(["python3 -m benchmarks.gpu_check", *sys.argv[1:]]),
               "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory(prefix="lpld-gpu-check-") as scratch, open(out / f"{NAME}.log", "w") as log:
        scratch = Path(scratch)
        env = child_environment(scratch, out, scratch)
        summary["machine"] = machine = probe(env, log)
        summary["steps"] = [run_step(step, env, scratch, machine, log) for step in steps
                            if not only or step.name in only]
        summary["seconds"] = round(time.monotonic() - started, 1)
        totals = {status: sum(step["status"] == status for step in summary["steps"])
                  for status in ("passed", "failed", "timed_out", "skipped")}
        summary["totals"] = totals
        log.write(f"\n=== done in {summary['seconds']} s: {totals}\n")
    tag = slug(summary["machine"])
    (out / f"{NAME}.log").replace(out / f"{NAME}-{tag}.log")
    path = out / f"{NAME}-{tag}.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return {**summary, "path": str(path)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="results folder (default: $OUT, else benchmarks/results)")
    parser.add_argument("--only", nargs="+", metavar="STEP", help=f"run only these of {[s.name for s in STEPS]}")
    args = parser.parse_args(argv)
    summary = check(out_dir(args.out), args.only)
    for step in summary["steps"]:
        tests = step.get("tests", {})
        counts = f" ({tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped)" if tests else ""
        print(f"{step['name']:14s} {step['status']:9s} {step.get('seconds', 0):7.1f} s{counts}"
              + (f": {step['reason']}" if "reason" in step else ""))
    print(f"summary: {summary['path']} ({summary['seconds']} s)")
    return 0 if not summary["totals"]["failed"] and not summary["totals"]["timed_out"] else 1


if __name__ == "__main__":
    sys.exit(main())

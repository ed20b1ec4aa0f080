"""Shared by every benchmark file: who ran the numbers and where they are written.

``write_benchmark_results(name, results, notes)`` (a fixture returning ``write_results``) stores
``benchmarks/results/<name>-<machine>.json`` (or under ``$LPLD_RESULTS_DIR``: the GPU check writes
into the folder that comes back from the GPU machine) with the machine's description next to the
numbers, so results from a 2-core CPU box and from a GPU never get mixed up.
"""
import datetime
import json
import os
import platform
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "LPLD_RESULTS_DIR"


def machine_info() -> dict:
    """CPU model, core count, library versions and the CUDA device (None without one)."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],  # 1-minute load when written: a busy machine skews the timings
        "cuda": torch.version.cuda if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else None,
    }


def machine_slug() -> str:
    """File-name tag: the GPU's name (e.g. nvidia-h100-80gb-hbm3), or cpu-<cores>c."""
    info = machine_info()
    name = info["device"] or f"cpu-{info['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def command_line() -> str:
    """How these numbers were made: the pytest invocation, with the thread settings that shape them."""
    env = " ".join(f"{key}={os.environ[key]}" for key in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if key in os.environ)
    return " ".join(part for part in (env, "python -m pytest", shlex.join(sys.argv[1:])) if part)


def write_results(name: str, results, notes: str = "") -> Path:
    """Write ``results`` (any JSON-able value) with machine info and a UTC time stamp; returns the path."""
    folder = Path(os.environ.get(RESULTS_ENV) or RESULTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{machine_slug()}.json"
    document = {
        "benchmark": name,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "machine": machine_info(),
        "notes": notes,
        "results": results,
    }
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


@pytest.fixture(scope="session")
def write_benchmark_results():
    """The shared writer, as a fixture so benchmark files need no import from conftest."""
    return write_results

"""The GPU check (benchmarks/gpu_check.py): which suites it runs, that a failing or overrunning step
does not stop the next, and that without CUDA every step skips with its reason and the summary is
still written."""
import json
from pathlib import Path

from benchmarks import gpu_check

CUDA_MACHINE = {"cuda_available": True, "cuda_op": 8.0, "device": "NVIDIA H100 80GB HBM3", "xdist": False}


def test_the_steps_run_the_cuda_suites_and_nothing_else():
    argv = {step.name: " ".join(step.argv) for step in gpu_check.STEPS}
    assert list(argv) == ["kernel-tests", "gpu-tests", "kernel-bench", "recover-bench", "train-bench"]
    assert argv["kernel-tests"].endswith("tests/test_kernel_bn_match.py tests/test_kernel_kl_div.py")
    assert "-m gpu" not in argv["kernel-tests"]  # the whole files: odd shapes and hypothesis cases too
    assert argv["gpu-tests"].endswith("-m gpu tests")
    benchmarks = " ".join(argv[name] for name in ("kernel-bench", "recover-bench", "train-bench"))
    assert "test_bench_scale" not in benchmarks and "test_bench_labels" not in benchmarks
    assert all(" benchmarks " not in f" {command} " for command in argv.values())  # never the whole folder
    assert sum(step.budget_s for step in gpu_check.STEPS) <= 480  # 8 minutes, the machine's start aside


def _test_file(folder: Path, name: str, body: str) -> str:
    path = folder / f"test_{name}.py"
    path.write_text(f"def test_{name}():\n    {body}\n")
    return str(path)


def test_a_failing_or_overrunning_step_does_not_stop_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "probe", lambda env, log: dict(CUDA_MACHINE))
    steps = (
        gpu_check.Step("fails", 60, ("pytest", "-q", _test_file(tmp_path, "fails", "assert 1 == 2")), "a failure"),
        gpu_check.Step("overruns", 3, ("pytest", "-q", _test_file(tmp_path, "overruns", "import time; time.sleep(60)")),
                       "a hang"),
        gpu_check.Step("passes", 60, ("pytest", "-q", _test_file(tmp_path, "passes", "assert True")), "a pass"),
    )
    summary = gpu_check.check(tmp_path / "out", steps=steps)
    by_name = {step["name"]: step for step in summary["steps"]}
    assert [step["status"] for step in summary["steps"]] == ["failed", "timed_out", "passed"]
    assert by_name["fails"]["tests"]["failed"] == 1 and "assert 1 == 2" in by_name["fails"]["tests"]["failures"][0]
    assert by_name["overruns"]["seconds"] < 30  # killed at its budget, children included
    assert by_name["passes"]["tests"]["passed"] == 1
    assert summary["totals"] == {"passed": 1, "failed": 1, "timed_out": 1, "skipped": 0}
    written = json.loads(Path(summary["path"]).read_text())
    assert Path(summary["path"]).name == "gpu-check-nvidia-h100-80gb-hbm3.json" and written["steps"] == summary["steps"]
    log = (tmp_path / "out" / "gpu-check-nvidia-h100-80gb-hbm3.log").read_text()
    assert all(f"=== {name}: " in log for name in by_name)


def test_only_runs_the_named_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "probe", lambda env, log: dict(CUDA_MACHINE))
    steps = tuple(gpu_check.Step(name, 60, ("pytest", "-q", _test_file(tmp_path, name, "assert True")), name)
                  for name in ("one", "two"))
    summary = gpu_check.check(tmp_path / "out", only=["two"], steps=steps)
    assert [step["name"] for step in summary["steps"]] == ["two"]


def test_without_cuda_every_step_skips_with_its_reason(tmp_path):
    """The real probe in a child process (the checkout's lpld, no interpreter), on this CPU machine."""
    summary = gpu_check.check(tmp_path, only=["kernel-tests", "train-bench"])
    machine = summary["machine"]
    assert machine["cuda_available"] is False and machine["torch"] and machine["triton"]
    assert machine["lpld_kernels"].startswith(str(gpu_check.ROOT / "kernels"))
    assert [step["status"] for step in summary["steps"]] == ["skipped", "skipped"]
    assert all(step["reason"] == "no CUDA device: torch.cuda.is_available() is False" for step in summary["steps"])
    broken_driver = {"cuda_available": True, "cuda_error": "RuntimeError('CUDA driver version is insufficient')"}
    assert "an op on it failed: RuntimeError('CUDA driver" in gpu_check.no_cuda(broken_driver)
    assert Path(summary["path"]).name == f"gpu-check-cpu-{machine['cores']}c.json"

"""lpld reproduce: a tiny grid end to end, its numbers against the students it trained, and a rerun that trains nothing."""
import json
import statistics
from dataclasses import asdict

import numpy as np
import pytest

from lpld.cli import main
from lpld.codecs import LogitCodec
from lpld.reproduce import Cell, Grid, summarize

from test_run import TINY
from test_train import CLASSES, write_folder


def test_cells_and_codec_names():
    grid = Grid(ipcs=(2, 4), epochs=(4, 2), ratios=(0.0, 0.5), frontier=("0.5:top2-fp8",), seeds=1)
    assert len(grid.cells) == 2 * 2 * 2 + 2 and grid.epochs_of(4) == 2
    assert Cell("class-wise", 2, 0.5, "top2-fp8") in grid.cells  # frontier cells at the smallest IPC
    assert Grid(ipcs=(2,), epochs=(100,)).student(Cell("across-class", 2, 0.975), 1) == "r0.975-e100-s1"
    assert grid.student(Cell("across-class", 4, 0.5), 1) == "r0.5-e2-s1"  # the IPC's student epochs
    assert Cell("across-class", 2, 0.975, "int8").labels == "labels-r0.975-int8"
    assert [LogitCodec.parse(n) for n in ("fp16", "fp8", "top2-int8")] == [LogitCodec(), LogitCodec(0, "fp8"), LogitCodec(2, "int8")]
    for bad in ("top-fp8", "top2", "int4", "top0-fp8"):
        with pytest.raises(ValueError):
            LogitCodec.parse(bad)
    repeated = Grid(ipcs=(2,), epochs=(4,), ratios=(0.5, 0.0), frontier=("0.5:fp16", "0.5:int8"), seeds=1)
    assert len(repeated.cells) == len(set(repeated.cells)) == 2 * 3  # 0.5:fp16 is the pruning cell at 0.5
    rows = [{**asdict(cell), "seed": 0, "top1": 50.0 + 10 * cell.ratio + (cell.batching == "class-wise"),
             "logit_bytes": 1, "bytes_on_disk": 1, "compression": 1.0, "records": 1} for cell in repeated.cells]
    claims = summarize(repeated, [], rows)["claims"]
    assert [(c["ratio"], c["class_wise_minus_across_class"]) for c in claims] == [(0.5, 1.0)]
    methods = Grid(ipcs=(2,), epochs=(4,), ratios=(0.5,), frontier=(), seeds=1, batchings=("class-wise",),
                   methods=("lpld", "lpqld"))
    assert methods.cells == [Cell("class-wise", 2, 0.5), Cell("class-wise", 2, 0.5, method="lpqld")]
    assert methods.student(methods.cells[1], 2) == "r0.5-e4-s2-lpqld" and methods.student(methods.cells[0], 2) == "r0.5-e4-s2"
    rows = [{**asdict(cell), "seed": seed, "top1": 60.0 + 5 * (cell.method == "lpqld") + seed,
             "logit_bytes": 1, "bytes_on_disk": 1, "compression": 2.0, "records": 1}
            for cell in methods.cells for seed in (0, 1)]
    claim, = summarize(methods, [], rows)["method_claims"]
    assert claim["lpqld_minus_lpld"] == 5.0 and claim["seed_spread"] == pytest.approx(2**0.5 / 2)
    assert claim["lpqld_ahead_beyond_spread"] and not claim["lpld_behind_beyond_spread"]
    with pytest.raises(Exception, match="unknown batching or method"):
        Grid(methods=("lpld", "kd"))
    with pytest.raises(Exception, match="RATIO:CODEC"):
        Grid(frontier=("0.9:int4",))
    with pytest.raises(Exception, match="one value per IPC"):
        Grid(ipcs=(10, 50), epochs=(100,))


def test_reproduce_grid_end_to_end_then_resumes(tmp_path):
    write_folder(tmp_path / "real" / "train", 4, seed=1)
    write_folder(tmp_path / "real" / "val", 3, seed=2)
    workdir = tmp_path / "run"
    args = ["reproduce", "--workdir", str(workdir), "--data", str(tmp_path / "real"), "--device", "cpu",
            *[item for override in TINY if not override.startswith(("train.epochs", "recover.ipc"))
              for item in ("--set", override)],
            "--ipc", "4", "--epochs", "4", "--ratios", "0", "0.75", "--frontier", "0.75:top2-fp8", "--seeds", "2",
            "--jobs", "2", "--name", "tiny"]
    assert main(args) == 0
    out = workdir / "reproduce"
    results = json.loads((out / "tiny.json").read_text())
    assert (out / "tiny.png").stat().st_size > 0 and "| 4 | class-wise |" in (out / "tiny.md").read_text()
    assert {(s["batching"], s["ipc"]) for s in results["sets"]} == {("class-wise", 4), ("across-class", 4)}
    assert len(results["cells"]) == 6
    grid = Grid(ipcs=(4,), epochs=(4,))
    for cell in results["cells"]:
        students = out / f"{cell['batching']}-ipc4" / "students"
        this = Cell(cell["batching"], 4, cell["ratio"], cell["codec"])
        top1 = [json.loads((students / grid.student(this, seed) / "summary.json").read_text())["top1"] for seed in (0, 1)]
        assert cell["top1"] == top1 and cell["mean"] == pytest.approx(np.mean(top1))
        assert cell["std"] == pytest.approx(np.std(top1, ddof=1))
        records = 12 if cell["ratio"] == 0 else 3  # 4 epochs x 3 batches of 4; a quarter kept
        per_sample = {"fp16": CLASSES * 2, "top2-fp8": 2 + 2}[cell["codec"]]  # fp8 values + uint8 indices
        assert (cell["records"], cell["logit_bytes"]) == (records, records * 4 * per_sample)
        assert cell["compression"] == pytest.approx(12 * 4 * CLASSES * 2 / (records * 4 * per_sample))
    diversity = json.loads((out / "class-wise-ipc4" / "analysis" / "diversity-class-wise.json").read_text())
    assert [s["mean_cosine"] for s in results["sets"] if s["batching"] == "class-wise"] == [diversity["mean_cosine"]]
    of = {(c["batching"], c["ratio"], c["codec"]): c["mean"] for c in results["cells"]}
    claim, = results["claims"]
    assert claim["class_wise_minus_across_class"] == pytest.approx(of["class-wise", 0.75, "fp16"] - of["across-class", 0.75, "fp16"])
    assert claim["drop_across_class"] == pytest.approx(of["across-class", 0.0, "fp16"] - of["across-class", 0.75, "fp16"])
    assert (out / "class-wise-ipc4" / "teacher.safetensors").resolve() == (workdir / "teacher.safetensors").resolve()

    assert main(["report", "--workdir", str(workdir)]) == 0  # the report shows the grid's claims
    page = json.loads((workdir / "report" / "report.json").read_text())
    assert page["reproduce"] == {"tiny": results["claims"]} and (workdir / "report" / "reproduce-tiny.png").is_file()

    checkpoints = sorted(out.glob("*/students/*/checkpoint.pt"))
    stamps = [path.stat().st_mtime_ns for path in checkpoints]
    assert len(checkpoints) == 12
    assert main(args) == 0  # everything resumes from its artifact: no student trains again
    assert [path.stat().st_mtime_ns for path in checkpoints] == stamps
    again = json.loads((out / "tiny.json").read_text())
    assert again["cells"] == results["cells"] and statistics.fmean(again["cells"][0]["top1"]) == results["cells"][0]["mean"]

    # longer students on the same sets: nothing is recovered or relabelled again, and they train beside the others
    labels = sorted(out.glob("*/labels/meta.json"))
    label_stamps = [path.stat().st_mtime_ns for path in labels]
    longer = [*args[: args.index("--epochs")], "--epochs", "6", "--ratios", "0", "--frontier", "--seeds", "1", "--name", "longer"]
    assert main(longer) == 0
    assert [path.stat().st_mtime_ns for path in labels] == label_stamps and len(labels) == 2
    assert [path.stat().st_mtime_ns for path in checkpoints] == stamps
    assert sorted(p.parent.name for p in out.glob("*/students/*-e6-*/summary.json")) == ["r0-e6-s0", "r0-e6-s0"]
    assert [c["top1"] for c in json.loads((out / "longer.json").read_text())["cells"]] == [
        [json.loads((out / f"{b}-ipc4" / "students" / "r0-e6-s0" / "summary.json").read_text())["top1"]]
        for b in ("class-wise", "across-class")]

    # the training-method axis: LPQLD's students beside LPLD's on the same class-wise images and labels
    methods = [*args[: args.index("--ratios")], "--ratios", "0.75", "--frontier", "--seeds", "1", "--batchings",
               "class-wise", "--methods", "lpld", "lpqld", "--name", "methods"]
    assert main(methods) == 0
    assert [path.stat().st_mtime_ns for path in checkpoints] == stamps  # LPLD's student is reused
    compared = json.loads((out / "methods.json").read_text())
    lpld_cell, lpqld_cell = compared["cells"]
    assert (lpld_cell["method"], lpqld_cell["method"]) == ("lpld", "lpqld")
    log = out / "class-wise-ipc4" / "students" / "r0.75-e4-s0-lpqld" / "metrics.jsonl"
    epochs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["teacher_temperature"] for e in epochs] == [20.0] * 4 and epochs[0]["student_temperature"] == 1.0
    claim, = compared["method_claims"]
    assert claim["lpqld_minus_lpld"] == pytest.approx(lpqld_cell["mean"] - lpld_cell["mean"])
    assert "| 4 | class-wise | lpqld |" in (out / "methods.md").read_text()

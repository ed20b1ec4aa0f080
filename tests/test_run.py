"""lpld run: the whole chain on a tiny ImageFolder recipe, then a rerun that reuses every artifact."""
import json

import pytest

from lpld import run as pipeline
from lpld.cli import main
from lpld.workdir import WorkDir

from test_train import CLASSES, SIDE, write_folder

TINY = [
    "data.dataset=imagefolder", f"data.num_classes={CLASSES}", "data.channels=3", f"data.resolution={SIDE}",
    "data.mean=0.4,0.5,0.6", "data.std=0.2,0.25,0.3", "model.arch=resnet10", "model.stem=3x3s2",
    "squeeze.epochs=1", "squeeze.batch_size=4", "squeeze.workers=0", "stats.batch_size=4", "stats.workers=0",
    "recover.ipc=4", "recover.iterations=2", "recover.jitter=-1,1", "relabel.epochs=4", "relabel.batch_size=4",
    "prune.ratio=0.75", "train.epochs=2", "train.compile=false", "train.workers=0", "train.loader=torch",
]


def test_run_chains_every_stage_then_reuses_them(tmp_path, capsys):
    write_folder(tmp_path / "real" / "train", 4, seed=1)
    write_folder(tmp_path / "real" / "val", 3, seed=2)
    args = ["run", "--workdir", str(tmp_path / "run"), "--data", str(tmp_path / "real"), "--device", "cpu",
            *[item for override in TINY for item in ("--set", override)]]
    assert main(args) == 0
    workdir = WorkDir(tmp_path / "run")
    summary = json.loads(workdir.summary.read_text())
    table = capsys.readouterr().out
    assert "teacher" in table and "student r0.75 (4x)" in table
    assert table.rstrip().endswith(f"report: {workdir.report / 'index.html'}")
    assert json.loads((workdir.report / "report.json").read_text())["accuracy"]["teacher"] == summary["teacher"]["top1"]

    stages = [row["stage"] for row in summary["stages"]]
    assert stages == ["squeeze", "stats", "recover", "diversity", "relabel", "prune", "train r0", "train r0.75",
                      "eval teacher"]
    report = json.loads((workdir.report / "report.json").read_text())
    assert report["missing"] == []  # the demo's report opens without a "Missing" box
    assert sorted(report["diversity"]) == ["class-wise", "real"]
    classes = [sorted(series["per_class"]) for series in report["diversity"].values()]
    assert classes[0] == classes[1] and len(classes[0]) == CLASSES  # real and distilled line up class by class
    passes = {row["stage"]: row["images_per_sec"] * row["seconds"] for row in summary["stages"][:2]}
    assert passes == {"squeeze": pytest.approx(4 * CLASSES), "stats": pytest.approx(4 * CLASSES)}  # 1 epoch, 1 pass
    assert not any(row["reused"] for row in summary["stages"])
    full, pruned = summary["students"]
    assert (full["ratio"], pruned["ratio"]) == (0.0, 0.75)
    assert full["records"] == 4 * 3 and pruned["records"] == 3  # 4 epochs x 3 batches, a quarter kept
    assert pruned["compression_factor"] == 4.0 and pruned["label_bytes"] < full["label_bytes"]
    for network in (summary["teacher"], full, pruned):
        assert 0 <= network["top1"] <= network["top5"] <= 100

    assert main(args) == 0
    again = json.loads(workdir.summary.read_text())
    assert all(row["reused"] for row in again["stages"][:-1])
    assert again["students"] == summary["students"] and again["teacher"] == summary["teacher"]
    assert "reused" in capsys.readouterr().out
    assert pipeline.student_name(0.975) == "r0.975"

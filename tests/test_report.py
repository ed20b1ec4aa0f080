"""lpld report: a page of what a work directory holds, checked against the files it was made from."""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torchvision.io import read_image

from lpld import report as reporting
from lpld import report_images
from lpld.cli import main
from lpld.errors import UserError
from lpld.recipes import PAPER_HEADLINE, paper_points
from lpld.workdir import WorkDir

from test_train import write_folder

SIDE, IPC = 8, 3


def write_distilled(folder, classes, batching, seed, recipe="fmnist", dataset="fmnist", ipc=IPC):
    """A recover-shaped ImageFolder of random grey PNGs with its manifest."""
    write_folder(folder, ipc, seed, classes=classes, channels=1, side=SIDE)
    manifest = {"batching": batching, "ipc": ipc, "num_classes": classes,
                "recipe": {"name": recipe, "data": {"dataset": dataset, "channels": 1}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def write_student(workdir, name, label_bytes, top1, factor, losses):
    folder = workdir.student(name)
    folder.mkdir(parents=True)
    summary = {"name": name, "finished": True, "label_bytes": label_bytes, "top1": top1, "top5": 99.0,
               "compression_factor": factor, "records": 10}
    (folder / "summary.json").write_text(json.dumps(summary))
    lines = [{"epoch": e, "loss": loss, **({"top1": top1 - 5 + e} if e % 2 else {})} for e, loss in enumerate(losses)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return summary


@pytest.fixture
def small_run(tmp_path):
    """runs/demo with images, two students, the run summary and diversity; runs/demo-across beside it."""
    workdir = WorkDir(tmp_path / "runs" / "demo")
    write_distilled(workdir.distilled, 3, "class-wise", seed=1)
    write_distilled(WorkDir(tmp_path / "runs" / "demo-across").distilled, 3, "across-class", seed=2)
    write_student(workdir, "r0", 1_391_785, 83.98, 1.0, [2.1e-4, 1.234567e-4, 9.87654e-5, 7.5e-5])
    write_student(workdir, "r0.975", 38_140, 76.98, 40.0, [3.0e-4, 2.5e-4, 2.2e-4, 2.1e-4])
    workdir.summary.write_text(json.dumps({
        "recipe": "fmnist", "workdir": str(workdir.root), "wall_seconds": 775.6,
        "teacher": {"top1": 89.75, "top5": 99.89},
        "stages": [{"stage": "squeeze", "reused": False, "seconds": 269.1, "unit": "img/s", "images_per_sec": 445.9},
                   {"stage": "recover", "reused": True, "seconds": 0.1, "unit": "img-steps/s", "images_per_sec": None}]}))
    workdir.analysis.mkdir()
    for name, values in (("class-wise", [0.7, 0.8, 0.75]), ("across-class", [0.85, 0.9, 0.88])):
        per_class = {f"c{c:05d}": v for c, v in enumerate(values)}
        workdir.diversity(name).write_text(json.dumps({"name": name, "mean_cosine": sum(values) / 3,
                                                       "per_class": per_class}))
    return workdir


def report_data(workdir):
    return json.loads((workdir.report / "report.json").read_text())


def test_the_report_of_a_small_run_has_every_section_and_opens_from_disk(small_run, capsys):
    assert main(["report", "--workdir", str(small_run.root)]) == 0
    index = small_run.report / "index.html"
    assert f"report: {index}" in capsys.readouterr().out
    page, markdown = index.read_text(), (small_run.report / "report.md").read_text()
    for title in ("The distilled images", "Accuracy against label bytes", "Within-class diversity",
                  "Stages and accuracy", "Training curves"):
        assert f"<h2>{title}</h2>" in page and f"## {title}" in markdown
    assert "Missing" not in page and report_data(small_run)["missing"] == []
    sources = re.findall(r'src="([^"]+)"', page)
    assert {"accuracy.png", "diversity.png", "curves.png"} <= set(sources)
    assert (small_run.report / "distilled.png").is_file() and "distilled.png" in page
    assert all((small_run.report / source).is_file() and "/" not in source for source in sources)
    assert not re.search(r"https?://|<script|<link", page)  # self-contained: no network, no scripts
    assert "Trouser" in page and "across-class" in page  # class names; the sibling run beside this one
    assert "1.235e-04" not in page and "7.5e-05" in page  # last losses at 4 significant digits


def test_each_grid_tile_equals_the_distilled_image_it_shows(small_run):
    reporting.write_report(small_run)
    grids = report_data(small_run)["distilled"]["grids"]
    assert {(grid["set"], grid["class"]) for grid in grids} == {
        (batching, name) for batching in ("class-wise", "across-class") for name in ("T-shirt/top", "Trouser", "Pullover")}
    for grid in grids:
        picture = read_image(str(small_run.report / grid["png"]))
        scale, pad, nrow = grid["scale"], grid["padding"], grid["nrow"]
        assert scale * SIDE >= report_images.GRID_TILE and grid["tile"] == [SIDE * scale] * 2
        assert len(grid["files"]) == IPC and all(f"/{grid['folder']}/" in path for path in grid["files"])
        step = SIDE * scale + pad  # make_grid: tiles of H*scale separated and surrounded by `pad` pixels
        for i, path in enumerate(grid["files"]):
            source = read_image(path)
            expected = source.repeat_interleave(scale, 1).repeat_interleave(scale, 2).expand(3, -1, -1)
            top, left = pad + (i // nrow) * step, pad + (i % nrow) * step
            assert torch.equal(picture[:, top:top + SIDE * scale, left:left + SIDE * scale], expected), (grid["png"], i)


def test_every_plotted_value_is_the_one_in_its_summary(small_run):
    reporting.write_report(small_run)
    data = report_data(small_run)
    accuracy = data["accuracy"]
    for point in accuracy["students"]:
        summary = json.loads((small_run.student(point["name"]) / "summary.json").read_text())
        assert (point["label_bytes"], point["top1"], point["compression_factor"]) == (
            summary["label_bytes"], summary["top1"], summary["compression_factor"])
    assert sorted(p["name"] for p in accuracy["students"]) == ["r0", "r0.975"]
    assert accuracy["teacher"] == json.loads(small_run.summary.read_text())["teacher"]["top1"]
    assert accuracy["paper"] == []  # the paper has no Fashion-MNIST numbers
    # the figure draws exactly these series (read back from the plot's data, not its pixels)
    figure = reporting.accuracy_figure(accuracy)
    drawn = figure.axes[0].collections[0].get_offsets().tolist()
    assert drawn == [[p["label_bytes"], p["top1"]] for p in accuracy["students"]]
    assert figure.axes[0].get_xscale() == "log"
    for name, curve in data["curves"].items():
        logged = [json.loads(line) for line in (small_run.student(name) / "metrics.jsonl").read_text().splitlines()]
        assert curve["loss"] == [line["loss"] for line in logged]
        assert list(zip(curve["eval_epoch"], curve["top1"])) == [(l["epoch"], l["top1"]) for l in logged if "top1" in l]
    for name, result in data["diversity"].items():
        assert result["per_class"] == json.loads(small_run.diversity(name).read_text())["per_class"]
    assert data["stages"] == json.loads(small_run.summary.read_text())["stages"]


def test_paper_points_are_the_readme_headline_table():
    # the original project's README, "Previous Soft Labels vs Ours" (GB = GiB, MB = MiB)
    gib, mib = 1024**3, 1024**2
    assert [(p["label"], p["label_bytes"], p["top1"]) for p in paper_points("imagenet1k", 10)] == [
        ("paper IPC10 previous, full labels", pytest.approx(5.67 * gib), 20.1),
        ("paper IPC10 LPLD 40x", pytest.approx(0.14 * gib), 20.2)]
    assert [(p["label_bytes"], p["top1"]) for p in paper_points("imagenet1k", 200)] == [
        (pytest.approx(113.33 * gib), 57.0), (pytest.approx(2.85 * gib), 59.6)]
    assert [(p["label_bytes"], p["top1"]) for p in paper_points("tiny", 50)] == [
        (pytest.approx(449 * mib), 41.1), (pytest.approx(11 * mib), 38.4)]
    assert [(p["label_bytes"], p["top1"]) for p in paper_points("imagenet21k", 20)] == [
        (pytest.approx(1286 * gib), 20.5), (pytest.approx(32 * gib), 29.4)]
    assert len(PAPER_HEADLINE) == 9 and len(paper_points("imagenet1k", 30)) == 10  # no IPC30 row: all five IPCs
    assert paper_points("fmnist", 10) == []


def test_an_imagenet_run_draws_the_papers_points_beside_its_students(tmp_path):
    workdir = WorkDir(tmp_path / "in1k")
    write_distilled(workdir.distilled, 2, "class-wise", seed=3, recipe="imagenet1k", dataset="imagefolder", ipc=10)
    write_student(workdir, "r0.975", 150_000_000, 19.0, 40.0, [1e-3, 9e-4])
    reporting.write_report(workdir)
    accuracy = report_data(workdir)["accuracy"]
    assert accuracy["paper"] == paper_points("imagenet1k", 10)
    figure = reporting.accuracy_figure(accuracy)
    assert figure.axes[0].collections[1].get_offsets().tolist() == [[p["label_bytes"], p["top1"]] for p in accuracy["paper"]]


def test_missing_pieces_are_named_not_raised(tmp_path, capsys):
    workdir = WorkDir(tmp_path / "partial")
    write_distilled(workdir.distilled, 2, "class-wise", seed=4)
    workdir.student("r0").mkdir(parents=True)  # a student still training: no summary, no metrics yet
    workdir.summary.write_text("{ truncated")
    assert main(["report", "--workdir", str(workdir.root)]) == 0
    missing = "\n".join(report_data(workdir)["missing"])
    for piece in ("trained students", "within-class diversity", "summary.json", "student r0 has not finished",
                  "training curves"):
        assert piece in missing
    page = (workdir.report / "index.html").read_text()
    assert "Missing from this work directory" in page and "lpld analyze diversity" in page
    assert "grid-class-wise-c00000.png" in page  # what exists is still shown

    (workdir.distilled / "c00002").mkdir()  # recover interrupted before this class's images
    reporting.write_report(workdir)
    assert "c00002 is empty" in "\n".join(report_data(workdir)["missing"])

    empty = WorkDir(tmp_path / "empty")
    empty.root.mkdir()
    assert main(["report", "--workdir", str(empty.root)]) == 0
    assert "distilled images" in "\n".join(report_data(empty)["missing"])
    assert main(["report", "--workdir", str(tmp_path / "nowhere")]) == 2
    assert "work directory" in capsys.readouterr().err and "Traceback" not in capsys.readouterr().err


def test_large_sets_show_a_spread_subset_or_the_chosen_classes(tmp_path):
    workdir = WorkDir(tmp_path / "many")
    write_distilled(workdir.distilled, 30, "class-wise", seed=5, recipe="tiny", dataset="tiny", ipc=1)
    reporting.write_report(workdir)
    shown = [grid["folder"] for grid in report_data(workdir)["distilled"]["grids"]]
    assert len(shown) == report_images.SUBSET_CLASSES and shown[0] == "c00000" and shown[-1] == "c00029"
    assert "--classes" in (workdir.report / "index.html").read_text()
    reporting.write_report(workdir, classes="3, c00017,3")
    assert [grid["folder"] for grid in report_data(workdir)["distilled"]["grids"]] == ["c00003", "c00017"]
    with pytest.raises(UserError, match="--classes"):
        reporting.write_report(workdir, classes="Zebra")


# ---------------------------------------------------------------- the benchmark page and docs/benchmarks.md's table

def test_the_docs_benchmark_table_is_generated_from_the_committed_results():
    from benchmarks import report as bench

    page = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    assert bench.docs_table(page) == bench.markdown_table(bench.load_results()), \
        "docs/benchmarks.md's benchmark table is stale: run `python -m benchmarks.report --docs`"


def test_benchmark_page_plots_the_results_with_a_column_per_machine(tmp_path, capsys):
    from benchmarks import report as bench

    results = tmp_path / "results"
    shutil.copytree(bench.RESULTS_DIR, results)
    gpu = json.loads((results / "kernels-cpu-2c.json").read_text())
    for row in gpu["results"]:
        row["speedup_vs_eager"] *= 2
    (results / "kernels-nvidia-h100.json").write_text(json.dumps(gpu))
    assert bench.main(["--results", str(results), "--out", str(tmp_path / "page")]) == 0
    assert "report:" in capsys.readouterr().out
    data = json.loads((tmp_path / "page" / "report.json").read_text())
    kernels = data["sections"]["kernels.png"]["series"]
    assert list(kernels) == ["cpu-2c", "nvidia-h100"]
    for machine, factor in (("cpu-2c", 1), ("nvidia-h100", 2)):
        source = json.loads((bench.RESULTS_DIR / "kernels-cpu-2c.json").read_text())["results"]
        assert kernels[machine] == {f"{row['case']}, {row['provider']}": pytest.approx(row["speedup_vs_eager"] * factor)
                                    for row in source if row["provider"] != "eager"}
    train = json.loads((bench.RESULTS_DIR / "train-cpu-2c.json").read_text())["results"]
    loaders = data["sections"]["loaders.png"]
    assert loaders["series"]["cpu-2c"] == {row["provider"]: row["images_per_sec"] for row in train}
    assert loaders["reference"]["cpu-2c"] == next(row["images_per_sec"] for row in train if row["provider"] == "resident")
    table = bench.markdown_table(bench.load_results(results))
    assert table.splitlines()[0] == "| suite | what | cpu-2c | nvidia-h100 |"
    rates = {row["provider"]: row["images_per_sec"] for row in train}
    dali = f"{rates['dali']:,.0f} img/s ({rates['dali'] / rates['resident']:.2f}x resident)"
    assert f"| train | student step, dali loader | {dali} | - |" in table  # the GPU-only column is empty
    figure = bench.bars_figure(kernels, "x")
    assert len(figure.axes) == 2 and [p.get_width() for p in figure.axes[1].patches] == list(kernels["nvidia-h100"].values())
    page = (tmp_path / "page" / "index.html").read_text()
    assert all((tmp_path / "page" / name).is_file() for name in re.findall(r'src="([^"]+)"', page))

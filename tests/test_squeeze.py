"""A tiny teacher run on generated Fashion-MNIST-format files: it learns, resumes, and imports weights."""
import numpy as np
import pytest
import torch

import lpld.squeeze as squeeze_module
from lpld.errors import UserError
from lpld.models import build_model, load_teacher, read_teacher_meta
from lpld.recipes import get_recipe
from lpld.squeeze import CHECKPOINT, squeeze
from lpld.workdir import WorkDir
from test_data import write_fmnist

pytestmark = pytest.mark.usefixtures("one_thread")


def brightness_classes(labels, rng):
    """Ten classes told apart by brightness (20 + 23 k plus noise): learnable in a few steps."""
    return np.clip(20 + 23 * labels[:, None, None] + rng.normal(0, 4, (len(labels), 28, 28)), 0, 255).astype(np.uint8)


@pytest.fixture
def recipe(tmp_path):
    root = tmp_path / "data"
    write_fmnist(root, n_train=120, n_val=60, pixels=brightness_classes)
    return get_recipe("fmnist", [f"data.root={root}", "squeeze.epochs=3", "squeeze.batch_size=20", "data.resolution=16",
                                 "squeeze.workers=0", "squeeze.lr=0.05"])


def test_training_learns_and_resumes_after_an_interruption(recipe, tmp_path, monkeypatch, capsys):
    workdir = WorkDir(tmp_path / "run")
    save = squeeze_module._save_checkpoint

    def save_then_stop(*args):
        save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(squeeze_module, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        squeeze(recipe, workdir, "cpu")
    assert (workdir.root / CHECKPOINT).is_file() and not workdir.teacher.exists()
    monkeypatch.setattr(squeeze_module, "_save_checkpoint", save)

    with pytest.raises(UserError, match="other squeeze"):
        squeeze(recipe.with_overrides(["squeeze.lr=0.2"]), workdir, "cpu")
    meta = squeeze(recipe, workdir, "cpu")
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert not (workdir.root / CHECKPOINT).exists()
    assert meta["val_top1"] > 30  # chance is 10%; this seed reaches 50%
    assert read_teacher_meta(workdir.teacher)["val_top1"] == meta["val_top1"]
    assert load_teacher(workdir.teacher, recipe) is not None


def test_weights_file_is_imported_and_scored(recipe, tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet10", 10, channels=1, stem="3x3s2")
    torch.save({"model": model.state_dict()}, tmp_path / "mine.pth")
    meta = squeeze(recipe, WorkDir(tmp_path / "run"), "cpu", weights=str(tmp_path / "mine.pth"))
    assert meta["source"].endswith("mine.pth") and 0 <= meta["val_top1"] <= 100
    teacher = load_teacher(tmp_path / "run" / "teacher.safetensors", recipe)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in model.state_dict().items())
    wrong = build_model("resnet10", 1000, channels=1, stem="3x3s2")
    torch.save(wrong.state_dict(), tmp_path / "imagenet.pth")
    with pytest.raises(UserError, match="1000 classes"):
        squeeze(recipe, WorkDir(tmp_path / "other"), "cpu", weights=str(tmp_path / "imagenet.pth"))

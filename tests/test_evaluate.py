"""evaluate: top-1/top-5 on the real Fashion-MNIST test split against a float64 numpy computation."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lpld import evaluate, models
from lpld.recipes import get_recipe

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    shape = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def linear_model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_accuracy_on_the_real_test_split_matches_a_direct_computation():
    recipe = get_recipe("fmnist")
    model = linear_model()
    metrics = evaluate.evaluate(model, recipe.data, "cpu", batch_size=1000)

    pixels = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz").reshape(10000, -1).astype(np.float64) / 255
    labels = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    x = (pixels - recipe.data.mean[0]) / recipe.data.std[0]
    weight, bias = (p.detach().double().numpy() for p in model[1].parameters())
    logits = x @ weight.T + bias
    ranked = np.argsort(-logits, axis=1)
    top1 = 100 * np.mean(ranked[:, 0] == labels)
    top5 = 100 * np.mean((ranked[:, :5] == labels[:, None]).any(axis=1))
    shifted = logits - logits.max(axis=1, keepdims=True)
    loss = np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(labels)), labels])

    assert metrics["images"] == 10000
    # float32 vs float64 may flip a near-tie: allow 2 of 10,000 images.
    assert abs(metrics["top1"] - top1) <= 0.02 and abs(metrics["top5"] - top5) <= 0.02
    assert metrics["loss"] == pytest.approx(loss, rel=1e-4)
    assert model.training  # the caller's mode is restored


def test_top5_counts_on_a_hand_made_set():
    # 4 images whose logits are the one-hot pixel pattern: the label's rank is set by hand.
    class Identity(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    logits = torch.tensor([[9.0, 8, 7, 6, 5, 4], [9, 8, 7, 6, 5, 4], [9, 8, 7, 6, 5, 4], [1, 2, 3, 4, 5, 6]])
    labels = torch.tensor([0, 4, 5, 5])  # top-1 hit, top-5 hit, miss, top-1 hit
    dataset = torch.utils.data.TensorDataset(logits.view(4, 1, 2, 3), labels)
    metrics = evaluate.evaluate(Identity(), get_recipe("fmnist").data, dataset=dataset, batch_size=3)
    assert metrics["top1"] == pytest.approx(50.0) and metrics["top5"] == pytest.approx(75.0)


def test_eval_command_reads_a_saved_network(tmp_path, capsys):
    from lpld.cli import main
    from test_run import TINY
    from test_train import write_folder

    write_folder(tmp_path / "real" / "train", 1, seed=1)
    write_folder(tmp_path / "real" / "val", 2, seed=2)
    overrides = [item for override in TINY for item in ("--set", override)]
    recipe = get_recipe("fmnist", TINY)
    torch.manual_seed(0)
    model = models.build_model("resnet10", recipe.data.num_classes, 3, "3x3s2")
    models.save_teacher(tmp_path / "teacher.safetensors", model, recipe)
    loaded = evaluate.load_network(tmp_path / "teacher.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    common = ["eval", "--workdir", str(tmp_path), "--data", str(tmp_path / "real"), "--device", "cpu",
              "--workers", "0", *overrides]
    assert main(common) == 0
    printed = capsys.readouterr().out
    direct = evaluate.evaluate(loaded, recipe.with_overrides([f"data.root={tmp_path / 'real'}"]).data)
    assert json.loads(printed.splitlines()[-1]) == direct
    assert main([*common, "--student", "missing"]) == 2
    assert "no network" in capsys.readouterr().err

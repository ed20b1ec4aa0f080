"""Diversity analysis: within-class cosine similarity against a direct numpy computation."""
import argparse
import json

import numpy as np
import pytest
import torch
import torchvision

from lpld import analyze, models
from lpld.errors import UserError
from lpld.recipes import get_recipe
from lpld.workdir import WorkDir


def _numpy_within_class(features: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    result = {}
    for label in np.unique(labels):
        rows = features[labels == label]
        pairs = [rows[i] @ rows[j] / (np.linalg.norm(rows[i]) * np.linalg.norm(rows[j]))
                 for i in range(len(rows)) for j in range(len(rows)) if i != j]
        if pairs:
            result[int(label)] = float(np.mean(pairs))
    return result


def test_within_class_cosine_matches_numpy():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(11, 6, generator=generator) + torch.tensor([1.0, 0, 0, 0, 0, 0])
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 0])  # class 3 has one image: no pair
    measured = analyze.within_class_cosine(features, labels)
    expected = _numpy_within_class(features.numpy().astype(np.float64), labels.numpy())
    assert set(measured) == {0, 1, 2} == set(expected)
    for label in expected:
        assert measured[label] == pytest.approx(expected[label], abs=1e-12)


def _resnet_features(model, x):
    """ResNet's penultimate features written out layer by layer."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


@pytest.fixture
def teacher_and_folder(tmp_path):
    recipe = get_recipe("fmnist", ["data.num_classes=3", "data.resolution=16"])
    torch.manual_seed(0)
    model = models.build_model("resnet10", 3, 1, "3x3s2").eval()
    models.save_teacher(tmp_path / "teacher.safetensors", model, recipe)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 4, 1, 16, 16), generator=generator, dtype=torch.uint8)
    images[1] = images[1, :1] // 2 + images[1] // 2  # class 1: similar images
    for label in range(3):
        folder = tmp_path / "distilled" / f"c{label:05d}"
        folder.mkdir(parents=True)
        for index in range(4):
            torchvision.io.write_png(images[label, index], str(folder / f"c{label:05d}_i{index:04d}.png"))
    return recipe, model, images, tmp_path


def test_diversity_of_an_imagefolder_matches_a_direct_computation(teacher_and_folder):
    recipe, model, images, root = teacher_and_folder
    report = analyze.diversity(root / "distilled", recipe, root / "teacher.safetensors", "cpu")
    mean, std = recipe.data.mean[0], recipe.data.std[0]
    with torch.no_grad():
        features = _resnet_features(model, (images.reshape(12, 1, 16, 16).float() / 255 - mean) / std)
    expected = _numpy_within_class(features.double().numpy(), np.repeat(np.arange(3), 4))
    assert list(report.per_class) == ["c00000", "c00001", "c00002"]
    assert list(report.per_class.values()) == pytest.approx([expected[c] for c in range(3)], abs=1e-5)
    assert report.mean == pytest.approx(np.mean(list(expected.values())), abs=1e-5)
    assert report.per_class["c00001"] > report.per_class["c00000"]  # the similar images score higher


def test_real_diversity_measures_a_seeded_sample_of_the_training_images(teacher_and_folder):
    """n images per class of the real train split, at the recipe resolution (32 px files centre-cropped
    to 16 after a resize), under the same measure as the distilled sets."""
    recipe, model, _, root = teacher_and_folder
    generator = torch.Generator().manual_seed(2)
    for label in range(3):
        folder = root / "real" / "train" / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(6):
            torchvision.io.write_png(torch.randint(0, 256, (1, 32, 32), generator=generator, dtype=torch.uint8),
                                     str(folder / f"{index}.png"))
    recipe = get_recipe("fmnist", ["data.num_classes=3", "data.resolution=16", "data.dataset=imagefolder",
                                   f"data.root={root / 'real'}"])
    images, labels, classes = analyze.real_sample(recipe, 4)
    assert images.shape == (12, 1, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and classes == ["c00000", "c00001", "c00002"]  # as distilled
    again, _, _ = analyze.real_sample(recipe, 4)
    assert torch.equal(again, images)  # seeded
    files = sorted((root / "real" / "train" / "class1").iterdir())
    resized = [torchvision.transforms.v2.functional.resize(torchvision.io.decode_image(str(f)), [16], antialias=True)
               for f in files]
    assert all(any(torch.equal(image, candidate) for candidate in resized) for image in images[4:8])
    report = analyze.real_diversity(recipe, root / "teacher.safetensors", "cpu", 4)
    mean, std = recipe.data.mean[0], recipe.data.std[0]
    with torch.no_grad():
        features = _resnet_features(model, (images.float() / 255 - mean) / std)
    expected = _numpy_within_class(features.double().numpy(), labels.numpy())
    assert list(report.per_class.values()) == pytest.approx([expected[c] for c in range(3)], abs=1e-5)


def test_command_prints_and_writes_the_report(teacher_and_folder, capsys):
    recipe, _, _, root = teacher_and_folder
    parser = argparse.ArgumentParser()
    analyze.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", "diversity", str(root / "distilled"), "--set", "data.num_classes=3",
                              "--set", "data.resolution=16", "--teacher", str(root / "teacher.safetensors"),
                              "--json", str(root / "report.json"), "--device", "cpu", "--workdir", str(root)])
    args.func(args)
    report = json.loads((root / "report.json").read_text())
    assert f"{report['mean_cosine']:.4f}" in capsys.readouterr().out
    assert sorted(report["per_class"]) == ["c00000", "c00001", "c00002"]
    # the work directory keeps a copy for `lpld report`, named after the folder (no recover manifest here)
    assert report["name"] == "distilled" and json.loads(WorkDir(root).diversity("distilled").read_text()) == report
    (root / "distilled" / "manifest.json").write_text(json.dumps({"batching": "across-class"}))
    assert analyze.set_name(root / "distilled") == "across-class"
    ablation = {"batching": "class-wise", "recipe": {"recover": {"stats": "global"}}}  # Table 4's "+C"
    (root / "distilled" / "manifest.json").write_text(json.dumps(ablation))
    assert analyze.set_name(root / "distilled") == "class-wise-global-stats"


def test_a_model_without_classifier_is_refused():
    with pytest.raises(UserError, match="nn.Linear"):
        analyze.penultimate_features(torch.nn.Conv2d(1, 2, 3), torch.zeros(1, 1, 4, 4))

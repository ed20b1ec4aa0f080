"""Networks by name and stem, teacher files, and user weight files."""
import copy
from dataclasses import replace

import pytest
import safetensors.torch
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from lpld import models
from lpld.errors import UserError
from lpld.models import apply_weights, bn_layers, build_model, load_teacher, load_weights_file, save_teacher
from lpld.recipes import RECIPES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("stem, kernel, stride, pooled, side", [
    ("standard", 7, 2, True, 1), ("3x3", 3, 1, False, 4), ("3x3s2", 3, 2, False, 2),
])
def test_stems_and_input_channels(stem, kernel, stride, pooled, side):
    model = build_model("resnet10", 7, channels=1, stem=stem)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (kernel, kernel)
    assert model.conv1.stride == (stride, stride) and isinstance(model.maxpool, nn.MaxPool2d) == pooled
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert isinstance(model.layer1[0], BasicBlock)
    features = nn.Sequential(*list(model.children())[:-2])
    assert features(torch.zeros(2, 1, 32, 32)).shape == (2, 512, side, side)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 7)


def test_torchvision_names_and_bn_layers():
    resnet18 = build_model("resnet18", 10, channels=3, stem="3x3")
    names = [name for name, _ in bn_layers(resnet18)]
    assert len(names) == 20 and "layer2.0.downsample.1" in names and names[0] == "bn1"  # SPEC.md section 2
    assert sum(bn.num_features for _, bn in bn_layers(resnet18)) == 4800
    mobile = build_model("mobilenet_v3_small", 5, channels=1)
    assert mobile(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(UserError, match="unknown architecture"):
        build_model("resnet7", 10)
    with pytest.raises(UserError, match="stem"):
        build_model("resnet18", 10, stem="5x5")
    with pytest.raises(UserError, match="ResNet-style"):
        build_model("mobilenet_v3_small", 10, stem="3x3")


def fmnist_teacher():
    torch.manual_seed(0)
    recipe = RECIPES["fmnist"]
    model = build_model(recipe.model.arch, recipe.data.num_classes, recipe.data.channels, recipe.model.stem)
    model.train()(torch.randn(8, 1, 28, 28))  # move the BN running statistics off their defaults
    return recipe, model.eval()


def test_teacher_round_trip_and_checks(tmp_path):
    recipe, model = fmnist_teacher()
    path = tmp_path / "teacher.safetensors"
    meta = save_teacher(path, model, recipe, val_top1=12.5)
    loaded = load_teacher(path, recipe)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.lpld_meta == meta and meta["val_top1"] == 12.5 and meta["arch"] == "resnet10"
    other = replace(recipe, model=replace(recipe.model, stem="3x3"))
    with pytest.raises(UserError, match="stem"):
        load_teacher(path, other)
    with pytest.raises(UserError, match="num_classes"):
        load_teacher(path, replace(recipe, data=replace(recipe.data, num_classes=11)))
    tensors = safetensors.torch.load_file(str(path))
    tensors["fc.bias"] += 1
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(UserError, match="damaged"):
        load_teacher(path, recipe)
    with pytest.raises(UserError, match="lpld squeeze"):
        load_teacher(tmp_path / "none.safetensors", recipe)


def test_weight_files_in_the_usual_wrappings(tmp_path):
    _, model = fmnist_teacher()
    state = model.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pth")
    torch.save({"model": state}, tmp_path / "wrapped.pt")
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("ddp.pth", "wrapped.pt", "w.safetensors"):
        loaded = load_weights_file(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


class NotWeights:
    pass


def test_bad_weight_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_weights_file(tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read"):
        load_weights_file(tmp_path / "garbage.pth")
    torch.save({"model": NotWeights()}, tmp_path / "code.pth")  # weights_only=True refuses arbitrary objects
    with pytest.raises(UserError, match="cannot read"):
        load_weights_file(tmp_path / "code.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match="state dict"):
        load_weights_file(tmp_path / "list.pth")


def test_mismatched_weights_name_the_problem():
    recipe, model = fmnist_teacher()
    state = model.state_dict()
    other_classes = build_model("resnet10", 1000, channels=1, stem="3x3s2").state_dict()
    with pytest.raises(UserError, match="1000 classes but the recipe has 10"):
        apply_weights(model, other_classes, "imagenet.pth")
    with pytest.raises(UserError, match="conv1.weight"):
        apply_weights(model, build_model("resnet10", 10, channels=1).state_dict(), "standard-stem.pth")
    with pytest.raises(UserError, match="missing"):
        apply_weights(model, {k: v for k, v in state.items() if k != "fc.bias"}, "partial.pth")
    with pytest.raises(UserError, match="unexpected"):
        apply_weights(model, build_model("resnet18", 10, channels=1, stem="3x3s2").state_dict(), "resnet18.pth")


def test_ghost_batch_norm_equals_a_loop_over_groups_in_float64():
    """Each group of ``rows`` rows is normalized by its own statistics; the running statistics follow
    the first group only (DataParallel kept device 0's); evaluation is plain BatchNorm."""
    torch.manual_seed(0)
    x = torch.randn(10, 3, 4, 5, dtype=torch.float64) * 2 + 1
    plain = torch.nn.BatchNorm2d(3).double()
    plain.weight.data.uniform_(0.5, 1.5)
    plain.bias.data.normal_()
    model = models.use_ghost_batch_norm(torch.nn.Sequential(copy.deepcopy(plain)), 4).double().train()
    assert isinstance(model[0], models.GhostBatchNorm2d) and model[0].rows == 4
    groups = [copy.deepcopy(plain).train() for _ in range(3)]
    expected = torch.cat([bn(part) for bn, part in zip(groups, x.split(4))])
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[0].running_mean, groups[0].running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[0].running_var, groups[0].running_var, rtol=1e-12, atol=1e-12)
    model.eval()
    groups[0].eval()
    torch.testing.assert_close(model(x), groups[0](x), rtol=1e-12, atol=1e-12)
    assert models.use_ghost_batch_norm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), 0)[0].__class__ is torch.nn.BatchNorm2d


def test_ghost_batch_norm_compiles_and_keeps_the_state_dict_keys():
    torch.manual_seed(0)
    model = models.use_ghost_batch_norm(models.build_model("resnet10", 4, 1, "3x3s2"), 2).train()
    assert set(model.state_dict()) == set(models.build_model("resnet10", 4, 1, "3x3s2").state_dict())
    x = torch.randn(6, 1, 16, 16)
    eager = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)

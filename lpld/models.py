"""Teacher and student networks: torchvision classifiers by name, with the stems the recipes need.

Every stage builds its networks here so that one (arch, stem, channels, classes) tuple means one
network everywhere. Weights are never downloaded: a teacher is trained by ``lpld squeeze`` or read
from a local file. Teacher files are safetensors with JSON metadata, so loading one executes no
code and says what network it holds (SPEC.md section 11, items 7 and 10).
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from .atomic import write_atomically
from .errors import UserError
from .fingerprint import tensors_sha256

STEMS = ("standard", "3x3", "3x3s2")
TEACHER_FORMAT = "lpld-teacher-v1"


def build_model(arch: str, num_classes: int, channels: int = 3, stem: str = "standard") -> nn.Module:
    """A randomly initialised classifier; "resnet10" is torchvision's ResNet with BasicBlock x [1,1,1,1].

    Stems: "standard" (torchvision's own), "3x3" (3x3 conv stride 1, no max-pool: the Tiny-ImageNet
    and CIFAR teachers of SPEC.md section 10.10) and "3x3s2" (3x3 stride 2, no max-pool: our
    Fashion-MNIST CPU demo, a quarter of the cost of "3x3").
    """
    if stem not in STEMS:
        raise UserError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)} (--set model.stem=...)")
    if arch == "resnet10":
        model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    else:
        try:
            model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        except ValueError:
            known = ", ".join(["resnet10", *torchvision.models.list_models(torchvision.models)])
            raise UserError(f"unknown architecture {arch!r}; choose resnet10 or a torchvision classifier: {known}") from None
    if stem != "standard":
        _use_small_stem(model, arch, channels, stride=1 if stem == "3x3" else 2)
    elif channels != 3:
        _set_input_channels(model, arch, channels)
    return model


def _use_small_stem(model: nn.Module, arch: str, channels: int, stride: int) -> None:
    """Replace a ResNet-style conv1 + max-pool by one 3x3 conv (padding 1) and no pooling."""
    if not isinstance(getattr(model, "conv1", None), nn.Conv2d) or not hasattr(model, "maxpool"):
        raise UserError(f"the 3x3 stems need a ResNet-style model (conv1 + maxpool); {arch!r} has none: use stem=standard")
    width = model.conv1.out_channels
    model.conv1 = nn.Conv2d(channels, width, kernel_size=3, stride=stride, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


def _set_input_channels(model: nn.Module, arch: str, channels: int) -> None:
    """Rebuild the first convolution (whatever its name) to read ``channels`` input planes."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            break
    else:
        raise UserError(f"{arch!r} has no convolution to adapt to {channels} input channels")
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    replacement = nn.Conv2d(
        channels, module.out_channels, module.kernel_size, module.stride, module.padding,
        module.dilation, module.groups, module.bias is not None, module.padding_mode,
    )
    nn.init.kaiming_normal_(replacement.weight, mode="fan_out", nonlinearity="relu")
    setattr(parent, name.rpartition(".")[2], replacement)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from consecutive groups of ``rows`` rows.

    This is what each DataParallel replica computed in upstream's student training (SPEC.md
    section 1.3: batch 128 over 4 GPUs, 32 rows per replica), so one GPU reproduces a 4-GPU run.
    The running statistics follow the first group alone, as DataParallel kept only device 0's
    buffers. Evaluation, and a batch of at most ``rows`` rows, is plain BatchNorm.
    """

    def __init__(self, num_features: int, rows: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.rows:
            return super().forward(x)
        first, *rest = x.split(self.rows)
        return torch.cat([super().forward(first), *(
            nn.functional.batch_norm(part, None, None, self.weight, self.bias, True, 0.0, self.eps) for part in rest)])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows={self.rows}"


def use_ghost_batch_norm(model: nn.Module, rows: int) -> nn.Module:
    """Replace every BatchNorm2d of ``model`` by a GhostBatchNorm2d over ``rows`` rows (state kept);
    ``rows`` 0 leaves the model as it is."""
    if rows <= 0:
        return model
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d:
            like = next(iter(module.state_dict().values()))
            ghost = GhostBatchNorm2d(module.num_features, rows, eps=module.eps, momentum=module.momentum,
                                     affine=module.affine, track_running_stats=module.track_running_stats,
                                     device=like.device, dtype=like.dtype)
            ghost.load_state_dict(module.state_dict())
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], ghost)
    return model


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BatchNorm2d in ``named_modules()`` order, downsample BNs included (SPEC.md section 2)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]


def model_fingerprint(model: nn.Module) -> str:
    """Short content hash of the state dict: later artifacts record which teacher made them."""
    return tensors_sha256(model.state_dict())[:16]


def save_teacher(path: str | Path, model: nn.Module, recipe, **extra_meta) -> dict:
    """Write the weights as safetensors with the network's description as JSON metadata.

    Written to a temporary name and renamed, so an interrupted save never leaves a half file.
    Returns the metadata written.
    """
    meta = {
        "format": TEACHER_FORMAT,
        "arch": recipe.model.arch,
        "stem": recipe.model.stem,
        "num_classes": recipe.data.num_classes,
        "channels": recipe.data.channels,
        "resolution": recipe.data.resolution,
        "dataset": recipe.data.dataset,
        "recipe": recipe.name,
        "fingerprint": model_fingerprint(model),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        **extra_meta,
    }
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    write_atomically(path, lambda partial: safetensors.torch.save_file(
        tensors, str(partial), metadata={"lpld": json.dumps(meta, sort_keys=True)}))
    return meta


def read_teacher_meta(path: str | Path) -> dict:
    """The JSON metadata of a teacher file, or a UserError saying how to make one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no teacher at {path}: run `lpld squeeze` first (or pass --workdir of a run that has one)")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("lpld", "{}"))
    except Exception as error:  # safetensors raises several types for a damaged header
        raise UserError(f"{path} is not a readable safetensors file ({error}); rerun `lpld squeeze`") from None
    if meta.get("format") != TEACHER_FORMAT:
        raise UserError(f"{path} is not an lpld teacher file (no {TEACHER_FORMAT} metadata); rerun `lpld squeeze`")
    return meta


def load_teacher(path: str | Path, recipe, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen teacher (eval mode, no gradients) after checking it fits the recipe.

    The stored fingerprint is recomputed, so a damaged or edited file is refused. The metadata is
    kept on the model as ``lpld_meta``.
    """
    meta = read_teacher_meta(path)
    wanted = {"arch": recipe.model.arch, "stem": recipe.model.stem,
              "num_classes": recipe.data.num_classes, "channels": recipe.data.channels}
    wrong = [f"{key}={meta.get(key)!r} (recipe: {value!r})" for key, value in wanted.items() if meta.get(key) != value]
    if wrong:
        raise UserError(f"teacher {path} does not fit recipe {recipe.name!r}: {', '.join(wrong)}; "
                        "rerun `lpld squeeze` or use a --workdir made with this recipe")
    model = build_model(meta["arch"], meta["num_classes"], meta["channels"], meta["stem"])
    apply_weights(model, safetensors.torch.load_file(str(path)), str(path))
    if model_fingerprint(model) != meta["fingerprint"]:
        raise UserError(f"teacher {path} is damaged (its weights do not match the recorded fingerprint); rerun `lpld squeeze`")
    model.lpld_meta = meta
    model.eval().requires_grad_(False)
    return model.to(device)


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors file or a torch file read with weights_only=True.

    Accepts the usual wrappings ({"model": sd}, {"state_dict": sd}) and the "module." prefix that
    DistributedDataParallel checkpoints carry.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; give a local .safetensors/.pth state dict (nothing is downloaded)")
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling and header errors come in many types
        raise UserError(f"cannot read weights from {path}: {error}. Expected a torchvision state dict "
                        "(.safetensors, or .pth/.pt saved with torch.save)") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with errors that name the mismatch and the fix."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(f"weights {source} do not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; check model.arch and model.stem")
    shapes = [(key, tuple(state[key].shape), tuple(value.shape)) for key, value in expected.items()
              if state[key].shape != value.shape]
    head = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1:]
    if shapes and head and all(key.rpartition(".")[0] == head[0] for key, _, _ in shapes):
        raise UserError(f"weights {source} have {shapes[0][1][0]} classes but the recipe has {shapes[0][2][0]}; "
                        "use weights for this data set or --set data.num_classes=...")
    if shapes:
        listed = ", ".join(f"{key} {got} vs model {want}" for key, got, want in shapes[:4])
        raise UserError(f"weights {source} have other shapes than the model: {listed}; check model.stem and data.channels")
    model.load_state_dict(state)

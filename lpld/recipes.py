"""The paper's numbers in one place: named, overridable recipes per dataset.

A recipe is a tree of frozen dataclasses, one per stage. Values come from SPEC.md (sections 1.3,
3, 4, 6 and 10); the ``fmnist`` recipe is ours, sized so that the whole pipeline runs in minutes
on 2 CPU cores (docs/pipeline.md, "Recipes", says what it trades away). Any field can be
overridden from the CLI with ``--set stage.field=value``.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, replace

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2302, 0.2265, 0.2262)
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


@dataclass(frozen=True)
class DataConfig:
    """Where the real data lives and how its images look to the models."""

    dataset: str  # "fmnist" | "imagefolder" | "tiny"
    num_classes: int
    resolution: int  # side of the square images the teacher, recover, relabel and train see
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    root: str | None = None  # None: the user must pass --data
    eval_resize: int | None = None  # ImageNet: Resize(256) then CenterCrop(eval_crop)
    eval_crop: int | None = None
    eval_squash: bool = False  # ImageNet-21K-P: Resize((resolution, resolution)), no crop


@dataclass(frozen=True)
class ModelConfig:
    """The teacher; the student defaults to the same architecture (``train.arch`` overrides)."""

    arch: str = "resnet18"  # a torchvision classifier name, or "resnet10" (BasicBlock x [1,1,1,1])
    stem: str = "standard"  # "standard" | "3x3" (stride 1, no max-pool) | "3x3s2" (stride 2, no max-pool)
    weights: str | None = None  # a local state-dict file; None means squeeze trains one


@dataclass(frozen=True)
class SqueezeConfig:
    """Teacher training from scratch (SGD + cosine), used when no weights file is given."""

    epochs: int = 90
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: str = "rrc"  # "rrc" (RandomResizedCrop + flip) | "pad-crop" (pad 2, random crop + flip)
    workers: int = 8
    seed: int = 0


@dataclass(frozen=True)
class StatsConfig:
    """Class-wise BN statistics pass (SPEC.md section 2)."""

    mode: str = "ema"  # "ema" (the paper's code) | "exact" (pooled moments over the pass)
    momentum: float = 0.1
    batch_size: int = 64
    crop_scale: tuple[float, float] = (0.08, 1.0)
    workers: int = 8
    seed: int = 0


@dataclass(frozen=True)
class RecoverConfig:
    """Class-wise image synthesis (SPEC.md section 3)."""

    ipc: int = 10
    iterations: int = 4000
    lr: float = 0.25
    r_bn: float = 0.01
    first_bn_weight: float = 10.0
    jitter: tuple[int, int] = (0, 32)  # torch.roll shift drawn from [lo, hi] per axis
    crop_scale: tuple[float, float] = (0.08, 1.0)
    pixel_space: str = "normalized"  # "normalized" (randn in normalized space) | "unit" ([0, 1], IN-21K)
    batching: str = "class-wise"  # "class-wise" (LPLD) | "across-class" (SRe2L baseline)
    bn_loss: str = "l2"  # "l2" (paper) | "rms" (per-channel RMS, architecture independent)
    stats: str = "class"  # class-wise batches match "class" statistics (LPLD) or "global" ones (Table 4 "+C")
    classes_per_step: int = 0  # classes optimized in one teacher forward; 0 = as many as fit
    image_format: str = "jpeg"  # "jpeg" | "png"
    jpeg_quality: int = 75
    seed: int = 0


@dataclass(frozen=True)
class RelabelConfig:
    """FKD-style soft labels (SPEC.md section 4)."""

    epochs: int = 300
    batch_size: int = 128
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: str = "flip"  # "flip" | "cutout" (IN-21K: Cutout 0.5 instead of flip)
    mix: str = "cutmix"  # "cutmix" | "none"
    seed: int = 42


@dataclass(frozen=True)
class PruneConfig:
    """Label pruning (SPEC.md section 5): keep 1 - ratio of the stored records."""

    ratio: float = 0.975
    pool: str = "random"  # "random" | "order" | "epoch" | a scorer name (see lpld.prune)
    seed: int = 0
    topk: int = 0  # lpld run's pruned store keeps each sample's top-k logits (0: all, the paper's)


@dataclass(frozen=True)
class TrainConfig:
    """Student training on the distilled images and the (pruned) label store (SPEC.md section 6)."""

    arch: str | None = None  # None: the teacher's architecture
    epochs: int = 300
    optimizer: str = "adamw"  # "adamw" | "sgd"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    warmup_epochs: int = 0
    temperature: float = 20.0  # the teacher's (T0 of a schedule)
    t2_scale: bool = False  # multiply the KL by T^2 (Tiny recipe)
    # LPQLD (lpld.student_loss): the teacher temperature's schedule over epochs (Dynamic Knowledge Reuse)
    temperature_schedule: str = "constant"  # constant (LPLD) | step | cosine | step_reverse | cosine_reverse
    temperature_step: int = 30  # epochs per step
    temperature_gamma: float = 0.5  # factor per step (LPQLD's default; its main tables ran 0.7)
    temperature_floor: float = 2.0  # the step schedule's lowest temperature
    temperature_min: float = 1.0  # the cosine schedules' lowest temperature
    student_temperature: float = 0.0  # 0: the teacher's (LPLD); else the student's own (LPQLD's alignment)
    calibrate_student: bool = False  # re-fit the student temperature after every epoch (LPQLD's dynamic alignment)
    micro_batch: int = 0  # 0: one optimizer step per record; else gradient accumulation
    bn_batch: int = 0  # BatchNorm statistics over groups of this many rows (ghost BN); 0 = the whole record
    bf16: bool = False  # bf16 autocast of student training and evaluation; the paper's runs are fp32
    teacher_logit_scale: float = 1.0  # stored logits times this before the temperature (IN-21K: 0.8)
    full_plan: str = "sampled"  # unpruned labels: "sampled" (nb draws with replacement) | "stored" (in order)
    split: str = "rows"  # torchrun: "rows" (each record's rows across ranks) | "records" (records across ranks)
    val_interval: int = 10
    compile: bool = True
    loader: str = "auto"  # "auto" (dali on GPU, torch on CPU) | "dali" | "torch"
    workers: int = 4
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    name: str
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def settings(self, *stages: str) -> dict:
        """The named sections without the data root: what an artifact records as the settings it was
        made with, so that changing a later stage (or moving the dataset) does not invalidate it."""
        chosen = {stage: dataclasses.asdict(getattr(self, stage)) for stage in stages}
        chosen.get("data", {}).pop("root", None)
        return {"name": self.name, **chosen}

    def with_overrides(self, assignments: list[str]) -> "Recipe":
        """Apply ``stage.field=value`` strings, parsing each value by the field's type."""
        recipe = self
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            stage, dot, name = key.strip().partition(".")
            section = getattr(recipe, stage, None) if dot else None
            if not sep or section is None or not dataclasses.is_dataclass(section):
                raise UserError(f"--set {assignment!r}: expected stage.field=value, e.g. recover.iterations=100")
            known = {f.name: f for f in fields(section)}
            if name not in known:
                raise UserError(f"--set {assignment!r}: {stage} has no field {name!r}; known: {', '.join(known)}")
            hint = typing.get_type_hints(type(section))[name]
            value = _parse(raw.strip(), hint, assignment)
            recipe = replace(recipe, **{stage: replace(section, **{name: value})})
        return recipe


def _parse(raw: str, hint, what: str):
    """Parse ``raw`` as ``hint`` (int, float, bool, str, tuples of those, or Optional of them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", ""):
            return None
        return _parse(raw, next(a for a in args if a is not type(None)), what)
    try:
        if origin is tuple:
            parts = [p for p in raw.strip("()[] ").split(",") if p.strip()]
            item = args[0]
            if args[-1] is not Ellipsis and len(parts) != len(args):
                raise ValueError(f"needs {len(args)} comma-separated values")
            return tuple(_parse(p.strip(), item, what) for p in parts)
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("needs true or false")
        return hint(raw)
    except ValueError as error:
        raise UserError(f"--set {what!r}: cannot read {raw!r} as {getattr(hint, '__name__', hint)} ({error})") from None


RECIPES: dict[str, Recipe] = {
    # ImageNet-1K, ResNet-18 teacher (a local torchvision state dict), SPEC.md 1.3 / 3 / 6.
    "imagenet1k": Recipe(
        name="imagenet1k",
        data=DataConfig("imagefolder", num_classes=1000, resolution=224, eval_resize=256, eval_crop=224),
        model=ModelConfig(arch="resnet18", stem="standard"),
        stats=StatsConfig(batch_size=64),
        recover=RecoverConfig(ipc=10, iterations=4000, lr=0.25, r_bn=0.01, jitter=(0, 32)),
        relabel=RelabelConfig(epochs=300, batch_size=128, mix="cutmix", flip="flip"),
        # bn_batch 32: upstream's DataParallel over 4 GPUs normalized each replica's 128 / 4 rows.
        train=TrainConfig(epochs=300, optimizer="adamw", lr=1e-3, weight_decay=0.01, temperature=20.0, bn_batch=32),
    ),
    # Tiny-ImageNet, 64 px, ResNet-18 with the 3x3 stem and no max-pool.
    "tiny": Recipe(
        name="tiny",
        data=DataConfig("tiny", num_classes=200, resolution=64, mean=TINY_MEAN, std=TINY_STD),
        model=ModelConfig(arch="resnet18", stem="3x3"),
        squeeze=SqueezeConfig(epochs=50, batch_size=256, lr=0.2, weight_decay=1e-4),
        stats=StatsConfig(batch_size=256),
        recover=RecoverConfig(ipc=50, iterations=4000, lr=0.1, r_bn=0.05, jitter=(-4, 4)),
        relabel=RelabelConfig(epochs=100, batch_size=64, mix="none", flip="flip"),
        train=TrainConfig(
            epochs=100, optimizer="sgd", lr=0.2, momentum=0.9, weight_decay=1e-4,
            warmup_epochs=5, temperature=20.0, t2_scale=True, bn_batch=64,
        ),
    ),
    # ImageNet-21K-P (10450 classes), [0, 1] pixel space without normalization.
    "imagenet21k": Recipe(
        name="imagenet21k",
        data=DataConfig(
            "imagefolder", num_classes=10450, resolution=224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
            eval_squash=True,
        ),
        model=ModelConfig(arch="resnet18", stem="standard"),
        recover=RecoverConfig(ipc=10, iterations=2000, lr=0.05, r_bn=0.25, jitter=(0, 32), pixel_space="unit"),
        relabel=RelabelConfig(epochs=300, batch_size=32, mix="none", flip="cutout"),
        # Upstream's label smoothing 0.2 on the logits scales them by 0.8 (teacher T 25 against the
        # student's 20); bn_batch 8 = 32 rows over 4 DataParallel GPUs.
        train=TrainConfig(epochs=300, optimizer="adamw", lr=2e-3, weight_decay=0.01, temperature=20.0, val_interval=50,
                          bn_batch=8, teacher_logit_scale=0.8),
    ),
    # Fashion-MNIST (Debian's dataset-fashion-mnist): the embedded demo, minutes on 2 CPU cores.
    "fmnist": Recipe(
        name="fmnist",
        data=DataConfig(
            "fmnist", num_classes=10, resolution=28, channels=1, mean=FMNIST_MEAN, std=FMNIST_STD,
            root="/usr/share/datasets/fashion-mnist",
        ),
        model=ModelConfig(arch="resnet10", stem="3x3s2"),
        squeeze=SqueezeConfig(epochs=2, batch_size=128, lr=0.1, weight_decay=5e-4, augment="pad-crop", workers=2),
        stats=StatsConfig(batch_size=128, workers=2),
        recover=RecoverConfig(
            ipc=10, iterations=500, lr=0.1, r_bn=0.05, jitter=(-2, 2), crop_scale=(0.5, 1.0),
        ),
        relabel=RelabelConfig(epochs=300, batch_size=25, mix="cutmix", flip="flip"),
        prune=PruneConfig(ratio=0.975),
        # No torch.compile on the CPU demo: ~30 s cold per student and no speed-up on 2 cores (ENV.md).
        train=TrainConfig(epochs=300, optimizer="adamw", lr=2e-3, weight_decay=0.01, temperature=20.0,
                          val_interval=50, compile=False, workers=0),
    ),
}

# The paper's headline results, as printed in the original project's README ("Previous Soft Labels
# vs Ours"; SPEC.md section 7), ResNet-18 students, top-1 %. Per row: recipe, IPC, the previous
# methods' full label size and accuracy, LPLD's 40x label size and accuracy. The README's "GB" and
# "MB" are GiB and MiB (SPEC.md section 8). No other paper numbers are sourced here, so none are drawn.
PAPER_HEADLINE = (
    ("imagenet1k", 10, "5.67 GB", 20.1, "0.14 GB", 20.2),
    ("imagenet1k", 20, "11.33 GB", 33.6, "0.29 GB", 33.0),
    ("imagenet1k", 50, "28.33 GB", 46.8, "0.71 GB", 46.7),
    ("imagenet1k", 100, "56.66 GB", 52.8, "1.43 GB", 54.0),
    ("imagenet1k", 200, "113.33 GB", 57.0, "2.85 GB", 59.6),
    ("tiny", 50, "449 MB", 41.1, "11 MB", 38.4),
    ("tiny", 100, "898 MB", 49.7, "22 MB", 46.1),
    ("imagenet21k", 10, "643 GB", 18.5, "16 GB", 21.3),
    ("imagenet21k", 20, "1286 GB", 20.5, "32 GB", 29.4),
)
PAPER_SOURCE = "LPLD README, \"Previous Soft Labels vs Ours\" (ResNet-18 students; GB = GiB)"


def paper_points(recipe_name: str | None, ipc: int | None = None) -> list[dict]:
    """The headline points of ``recipe_name`` (those at ``ipc`` when the table has it, else all of
    them) as {label, ipc, compression_factor, label_bytes, top1} for drawing beside a run's students."""
    rows = [row for row in PAPER_HEADLINE if row[0] == recipe_name]
    if any(row[1] == ipc for row in rows):
        rows = [row for row in rows if row[1] == ipc]
    unit = {"GB": 1024**3, "MB": 1024**2}
    points = []
    for _, row_ipc, previous_size, previous_top1, ours_size, ours_top1 in rows:
        for label, size, top1, factor in (("previous, full labels", previous_size, previous_top1, 1.0),
                                          ("LPLD 40x", ours_size, ours_top1, 40.0)):
            number, suffix = size.split()
            points.append({"label": f"paper IPC{row_ipc} {label}", "ipc": row_ipc, "compression_factor": factor,
                           "label_bytes": float(number) * unit[suffix], "top1": top1})
    return points


# LPQLD's training (its scripts/reproduce/lpqld_in1k.sh and lpqld_in21k.sh): T0 = 20, a step schedule of
# 30 epochs x 0.7 floored at 2 (Dynamic Knowledge Reuse), the student's temperature calibrated after
# every epoch starting from 1.0.
LPQLD_TRAINING = ("train.temperature=20", "train.temperature_schedule=step", "train.temperature_step=30",
                  "train.temperature_gamma=0.7", "train.temperature_floor=2", "train.student_temperature=1",
                  "train.calibrate_student=true")
# Named presets per recipe: what a published setting ran, applied before --set. LPQLD's main
# ImageNet-1K table labels at x40 by pruning 0.9 and keeping the top 100 of 1000 logits (its README's
# x40 column); its ImageNet-21K script pairs pruning 0.975 with the top 2000 of 10,450 (its README's
# x40/x400 column names do not pin the pair down; this is the script's 0.975 run).
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "lpqld": {"imagenet1k": LPQLD_TRAINING + ("prune.ratio=0.9", "prune.topk=100"),
              "imagenet21k": LPQLD_TRAINING + ("prune.ratio=0.975", "prune.topk=2000"),
              "tiny": LPQLD_TRAINING, "fmnist": LPQLD_TRAINING},
}


def get_recipe(name: str, overrides: list[str] | None = None, preset: str | None = None) -> Recipe:
    """Recipe ``name``, then the settings of ``preset`` (e.g. "lpqld"), then ``overrides``."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose one of: {', '.join(sorted(RECIPES))}")
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
    chosen = list(PRESETS[preset][name]) if preset else []
    return RECIPES[name].with_overrides(chosen + list(overrides or []))


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every stage command shares: which recipe, overrides, and the work directory."""
    parser.add_argument("--recipe", default="fmnist", help=f"one of {', '.join(sorted(RECIPES))} (default fmnist)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="a published setting on top of the recipe: lpqld = LPQLD's training (teacher temperature "
                             "schedule, calibrated student) and, for imagenet1k/imagenet21k, its pruning and top-k")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                        help="override a recipe value, e.g. --set recover.iterations=100 (repeatable)")
    parser.add_argument("--workdir", default=None, help="directory holding this run's artifacts (default runs/RECIPE)")
    parser.add_argument("--data", default=None, help="dataset root (default: the recipe's, if it has one)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present)")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = get_recipe(args.recipe, args.overrides, getattr(args, "preset", None))
    if args.data is not None:
        recipe = replace(recipe, data=replace(recipe.data, root=args.data))
    return recipe

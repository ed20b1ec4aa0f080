"""``lpld stats``: per-class statistics of every BatchNorm input, from one pass over the real data.

SPEC.md section 2 and 10.1: the teacher runs in eval mode over the training set with training
augmentation; for each BN layer and class we keep the mean and biased variance of the BN input
over (N, H, W). Instead of a BN subclass and a tuple-passing model (upstream), forward pre-hooks on
stock ``nn.BatchNorm2d`` record per-sample moments, and the per-class reduction is one
``index_add_`` per layer (SPEC.md section 11.7). The result is a separate safetensors file.

Modes:
- "ema" (the paper's code): per batch, each class present folds its batch moments into a running
  value, ``s <- (1 - m) s + m * batch``, starting from mean 0 / var 1.
- "exact": pooled moments of the whole pass from float64 running sums (sum of per-sample means
  and of per-sample E[x^2]); all-reduced across torchrun ranks.

Several ranks in "ema" mode: EMA states of different shards cannot be merged afterwards, so at
every step the per-sample moments of all ranks are all-gathered and folded as ONE batch of
world x batch_size images, in rank order. Every rank then holds the same state, equal to a single
process running with the global batch. The traffic is 2 x (sum of BN channels) floats per image
(38 KB for ResNet-18), far less than the [K, C] tables. (Upstream instead kept rank 0's EMA over
its quarter of ImageNet, SPEC.md section 2; one process with ``--set stats.batch_size=64``
reproduces its per-batch class moments.) DistributedSampler pads the last step with a few repeated
images so that all ranks take the same number of steps.

Interrupted passes continue from a per-rank checkpoint in the work directory (same image order;
augmentation draws after the resume point differ from an uninterrupted pass).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from . import distributed, identity
from .data import load_real, train_transform
from .atomic import write_atomically
from .errors import UserError
from .models import bn_layers, load_teacher, model_fingerprint
from .recipes import add_recipe_arguments, recipe_from_args
from .workdir import WorkDir

MODES = ("ema", "exact")
STATS_FORMAT = "lpld-class-bn-stats-v1"


@dataclass
class LayerStats:
    mean: torch.Tensor  # float32 [K, C]
    var: torch.Tensor  # float32 [K, C], biased
    count: torch.Tensor  # int64 [K], images of each class seen


@dataclass
class ClassBNStats:
    """Per-class BN-input statistics for every BatchNorm2d of one teacher, keyed by module name."""

    layers: dict[str, LayerStats]
    meta: dict

    def save(self, path: str | Path) -> None:
        tensors = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.mean"] = layer.mean.float().contiguous()
            tensors[f"{name}.var"] = layer.var.float().contiguous()
            tensors[f"{name}.count"] = layer.count.long().contiguous()
        metadata = {"format": STATS_FORMAT, "layers": json.dumps(list(self.layers)), "meta": json.dumps(self.meta)}
        write_atomically(path, lambda partial: safetensors.torch.save_file(tensors, str(partial), metadata=metadata))

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None, num_classes: int | None = None,
             teacher_fingerprint: str | None = None) -> "ClassBNStats":
        """Read a statistics file, refusing one that does not belong to ``model`` / ``num_classes``.

        ``teacher_fingerprint`` (``models.model_fingerprint`` of the teacher as saved) also
        refuses statistics collected with another teacher of the same shape.
        """
        path = Path(path)
        if not path.is_file():
            raise UserError(f"no class-BN statistics at {path}: run `lpld stats` first")
        try:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = safetensors.torch.load_file(str(path))
        except Exception as error:  # safetensors raises several types for damaged files
            raise UserError(f"{path} is not a readable safetensors file ({error}); rerun `lpld stats`") from None
        if metadata.get("format") != STATS_FORMAT:
            raise UserError(f"{path} is not an lpld class-BN statistics file; rerun `lpld stats`")
        meta = json.loads(metadata["meta"])
        layers = {name: LayerStats(tensors[f"{name}.mean"], tensors[f"{name}.var"], tensors[f"{name}.count"])
                  for name in json.loads(metadata["layers"])}
        stats = cls(layers, meta)
        stats._check(path, model, num_classes, teacher_fingerprint)
        return stats

    def _check(self, path: Path, model, num_classes, teacher_fingerprint) -> None:
        fix = "rerun `lpld stats` with this teacher and recipe"
        classes = {layer.mean.shape[0] for layer in self.layers.values()} | {self.meta.get("num_classes")}
        if num_classes is not None and classes != {num_classes}:
            raise UserError(f"{path} holds statistics for {sorted(classes, key=str)} classes, not {num_classes}; {fix}")
        if model is not None:
            expected = {name: bn.num_features for name, bn in bn_layers(model)}
            found = {name: layer.mean.shape[-1] for name, layer in self.layers.items()}
            if expected != found:
                differ = sorted(set(expected.items()) ^ set(found.items()))[:4]
                raise UserError(f"{path} does not match the teacher's BN layers (e.g. {differ}); {fix}")
        if teacher_fingerprint is not None:
            identity.check(self.meta, {"teacher_fingerprint": teacher_fingerprint}, path, fix)


class _MomentRecorder:
    """Forward pre-hooks that keep each BN input's per-sample mean and biased variance ([B, C] each)."""

    def __init__(self, model: nn.Module):
        self.layers = bn_layers(model)
        if not self.layers:
            raise UserError("the model has no BatchNorm2d layers: class-BN statistics need a BN network")
        self.moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [bn.register_forward_pre_hook(self._hook(name)) for name, bn in self.layers]

    def _hook(self, name: str):
        def record(module, args):
            var, mean = torch.var_mean(args[0].float(), dim=(2, 3), correction=0)
            self.moments[name] = (mean, var)
        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _ClassMoments:
    """Per-class running state of one pass, in float64: EMA values or pooled sums."""

    def __init__(self, layers, num_classes: int, mode: str, momentum: float, device, made_by: dict):
        self.mode, self.momentum = mode, momentum
        self.made_by = made_by  # the pass's identity: a checkpoint of another pass is refused
        self.batches = 0  # folded so far by this rank
        self.count = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.first = {}  # EMA: running mean; exact: sum of per-sample means
        self.second = {}  # EMA: running var; exact: sum of per-sample E[x^2]
        for name, bn in layers:
            shape = (num_classes, bn.num_features)
            self.first[name] = torch.zeros(shape, dtype=torch.float64, device=device)
            fill = 1.0 if mode == "ema" else 0.0
            self.second[name] = torch.full(shape, fill, dtype=torch.float64, device=device)

    def fold(self, labels: torch.Tensor, moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
             weight: torch.Tensor | None = None) -> None:
        """Add one batch: ``labels`` [B], per layer per-sample (mean, var) [B, C], ``weight`` [B]
        (1 per sample, 0 for the padding rows of a gathered step; None: all 1).

        Every shape is fixed by B, so a GPU step never waits for the host (no ``unique``, no
        class count read back). Exact mode adds each sample into its class's sums. EMA pools each
        sample into the slot of its class's first sample in the batch: slots of present classes
        fold their batch moments into their class rows, the other slots add exactly 0; so
        10,450 classes cost no more per batch than 10.
        """
        weight = torch.ones_like(labels, dtype=torch.float64) if weight is None else weight.double()
        self.count.index_add_(0, labels, weight.long())
        m = self.momentum
        if self.mode == "ema":
            slot = (labels[:, None] == labels[None, :]).int().argmax(dim=1)  # first sample of the same class
            n = torch.zeros_like(weight).index_add_(0, slot, weight)[:, None]
            present, n = n > 0, n.clamp(min=1)
        for name, (mean, var) in moments.items():
            mean = mean.double()
            weighted_mean, weighted_square = (weight[:, None] * v for v in (mean, var.double() + mean * mean))
            if self.mode == "exact":
                self.first[name].index_add_(0, labels, weighted_mean)
                self.second[name].index_add_(0, labels, weighted_square)
                continue
            batch_mean = torch.zeros_like(mean).index_add_(0, slot, weighted_mean) / n
            batch_var = (torch.zeros_like(mean).index_add_(0, slot, weighted_square) / n
                         - batch_mean * batch_mean).clamp(min=0)
            for state, batch in ((self.first[name], batch_mean), (self.second[name], batch_var)):
                state.index_add_(0, labels, torch.where(present, m * (batch - state[labels]), 0.0))

    def save(self, path: Path) -> None:
        """Write the running state (torch tensors only, read back with weights_only=True)."""
        state = {"identity": self.made_by, "mode": self.mode, "batches": self.batches, "count": self.count,
                 "first": self.first, "second": self.second}
        write_atomically(path, lambda partial: torch.save(state, partial))

    def restore(self, path: Path) -> None:
        state = torch.load(path, map_location=self.count.device, weights_only=True)
        identity.check(state.get("identity"), self.made_by, path, "delete it to start the statistics pass afresh")
        self.batches, self.count = state["batches"], state["count"]
        self.first, self.second = state["first"], state["second"]

    def result(self) -> dict[str, LayerStats]:
        if self.mode == "exact":
            for tensor in [self.count, *self.first.values(), *self.second.values()]:
                distributed.all_reduce_sum(tensor)
        layers = {}
        for name in self.first:
            if self.mode == "ema":
                mean, var = self.first[name], self.second[name]
            else:
                n = self.count.clamp(min=1).to(torch.float64)[:, None]
                seen = (self.count > 0)[:, None]
                mean = torch.where(seen, self.first[name] / n, 0.0)
                var = torch.where(seen, (self.second[name] / n - mean * mean).clamp(min=0), 1.0)
            layers[name] = LayerStats(mean.float().cpu(), var.float().cpu(), self.count.cpu().clone())
        return layers


def _gather_batch(labels: torch.Tensor, moments: dict, max_batch: int) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """All ranks' labels, per-sample moments and row weights of this step, in rank order (ema mode).

    Ranks may hold batches of different sizes: each pads its rows to ``max_batch``, a size every
    rank knows without asking, and padding rows carry weight 0 (so no rank reads sizes back).
    """
    if distributed.world_size() == 1:
        return labels, moments, None
    if len(labels) > max_batch:
        raise UserError(f"a batch of {len(labels)} images exceeds max_batch={max_batch}, the padded size of the "
                        "gathered EMA step; pass the loader's batch size")
    names = list(moments)
    local = torch.cat([torch.cat(moments[name], dim=1) for name in names]
                      + [labels[:, None].float(), torch.ones_like(labels[:, None], dtype=torch.float32)], dim=1)
    padded = local.new_zeros((max_batch, local.shape[1]))
    padded[:len(local)] = local
    gathered = distributed.all_gather_rows(padded)
    out, start = {}, 0
    for name in names:
        width = moments[name][0].shape[1]
        out[name] = (gathered[:, start:start + width], gathered[:, start + width:start + 2 * width])
        start += 2 * width
    return gathered[:, -2].round().long(), out, gathered[:, -1]


def collect_class_bn_stats(model: nn.Module, loader, num_classes: int, mode: str = "ema", momentum: float = 0.1,
                           device: torch.device | str = "cpu", meta: dict | None = None,
                           checkpoint: Path | None = None, every: int = 200, max_batch: int = 0) -> ClassBNStats:
    """One pass of ``loader`` ((images, labels) host batches) through ``model`` in eval mode (SPEC.md 10.1).

    The model's global BN running statistics are not touched (eval mode); its train/eval mode is
    restored afterwards. ``meta`` is merged into the result's metadata. With ``checkpoint`` (one
    file per rank), the running state is saved every ``every`` batches and an existing file is
    continued: ``loader`` must then yield only the batches after ``batches_done(checkpoint)``.
    ``max_batch``: the most images a rank's batch holds (needed by ema mode under torchrun).

    On a GPU the steady state never waits for the device: labels are range-checked on the host
    before their copy, the class moments fold with fixed shapes, the progress bar shows host
    counts; only the checkpoint (every ``every`` batches) and the result read the device back.
    """
    if mode not in MODES:
        raise UserError(f"unknown stats mode {mode!r}; choose one of: {', '.join(MODES)}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    recorder = _MomentRecorder(model)
    info = {"num_classes": num_classes, "mode": mode, "momentum": momentum, "world_size": distributed.world_size(),
            "teacher_fingerprint": model_fingerprint(model), **(meta or {})}
    state = _ClassMoments(recorder.layers, num_classes, mode, momentum, device,
                          identity.of(**info, layers=[name for name, _ in recorder.layers]))
    if checkpoint is not None and checkpoint.is_file():
        state.restore(checkpoint)
    seen, started = 0, time.time()
    try:
        progress = tqdm(loader, desc=f"class-BN stats ({mode})", disable=not distributed.is_main(),
                        initial=state.batches, total=state.batches + len(loader))
        with torch.inference_mode():
            for images, labels in progress:
                if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
                    raise UserError(f"a label outside [0, {num_classes}) reached the statistics pass; check data.num_classes")
                labels = labels.to(device, non_blocking=True)
                model(images.to(device, non_blocking=True))
                if mode == "ema":
                    state.fold(*_gather_batch(labels, recorder.moments, max_batch))
                else:  # pooled sums: each rank folds its own samples, result() all-reduces
                    state.fold(labels, recorder.moments)
                seen += len(labels) * distributed.world_size()
                state.batches += 1
                progress.set_postfix(img_s=f"{seen / (time.time() - started):.0f}", refresh=False)
                if checkpoint is not None and state.batches % every == 0:
                    state.save(checkpoint)
    finally:
        recorder.remove()
        model.train(was_training)
    layers = state.result()
    images = int(next(iter(layers.values())).count.sum())  # over all ranks, as count is gathered or reduced
    return ClassBNStats(layers, {**info, "images": images})


def batches_done(checkpoint: Path) -> int:
    """How many batches a checkpoint of ``collect_class_bn_stats`` has folded (0 without one)."""
    if not checkpoint.is_file():
        return 0
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["batches"])


def stats(recipe, workdir: WorkDir, device: torch.device | str) -> ClassBNStats:
    """``lpld stats``: the pass over the real training split with RRC(crop_scale) + flip + normalise."""
    distributed.init(device)
    device = distributed.device(device)
    with distributed.sole_writer(workdir.stats):
        cfg = recipe.stats
        if workdir.stats.is_file():
            if distributed.is_main():
                print(f"stats: {workdir.stats} exists; delete it to collect again")
            teacher = load_teacher(workdir.teacher, recipe)
            return ClassBNStats.load(workdir.stats, teacher, recipe.data.num_classes, model_fingerprint(teacher))
        teacher = load_teacher(workdir.teacher, recipe, device)
        dataset = load_real(recipe.data, "train", train_transform(recipe.data, scale=cfg.crop_scale), workdir.listings)
        torch.manual_seed(cfg.seed + distributed.rank())
        checkpoint = workdir.root / f"stats-checkpoint.rank{distributed.rank()}.pt"
        done = batches_done(checkpoint)
        if done and distributed.is_main():
            print(f"stats: resuming after {done} batches from {checkpoint}")
        order = list(DistributedSampler(dataset, distributed.world_size(), distributed.rank(), shuffle=True, seed=cfg.seed))
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=order[done * cfg.batch_size:],
                            num_workers=cfg.workers, pin_memory=device.type == "cuda")
        started = time.time()
        meta = {"arch": recipe.model.arch, "stem": recipe.model.stem, "resolution": recipe.data.resolution,
                "dataset_fingerprint": dataset.fingerprint, "recipe": recipe.name, "batch_size": cfg.batch_size,
                "crop_scale": list(cfg.crop_scale), "seed": cfg.seed}
        result = collect_class_bn_stats(teacher, loader, recipe.data.num_classes, cfg.mode, cfg.momentum, device, meta,
                                        checkpoint, max_batch=cfg.batch_size)
        if distributed.is_main():
            result.save(workdir.stats)
            channels = sum(layer.mean.shape[1] for layer in result.layers.values())
            print(f"stats: {cfg.mode} statistics of {len(result.layers)} BN layers ({channels} channels) x "
                  f"{recipe.data.num_classes} classes from {result.meta['images']} images in "
                  f"{time.time() - started:.0f} s -> {workdir.stats}")
        distributed.barrier()
        checkpoint.unlink(missing_ok=True)
        return result


def _command(args: argparse.Namespace) -> None:
    recipe = recipe_from_args(args)
    stats(recipe, WorkDir.for_recipe(args.workdir, recipe.name), distributed.device(args.device))


def register(subparsers) -> None:
    parser = subparsers.add_parser("stats", help="collect class-wise BN statistics of the teacher on the real data")
    add_recipe_arguments(parser)
    parser.set_defaults(func=_command)

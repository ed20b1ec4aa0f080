"""Recover: synthesize the distilled images from noise through the frozen teacher (SPEC.md section 3).

LPLD optimizes the IPC images of one class as a group matched against that class's BN statistics
at every BN layer, plus cross-entropy toward the class. The SRe2L baseline (``across-class``)
optimizes batches holding one image per class against the teacher's global running statistics.

Both are expressed here as *jobs*: a job is one group of images with one statistics row, one
optimizer schedule and one random stream (crop box, flip and roll shared by the group at every
iteration). Because the teacher is in eval mode, samples do not interact in its forward; the
loss is a sum of per-job losses and Adam is elementwise, so several jobs concatenated into one
forward follow the trajectories they would follow alone, to float rounding (SPEC.md section 11.8:
on the CPU the tests hold it to 1e-12 in float64; on a GPU cuDNN may pick another convolution
algorithm for another batch size). Each job draws from its own generator seeded from
(recover.seed, job id), so its random stream is the same however many jobs share a step, which
rank runs them, or after a resume.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

import lpld_kernels

from . import bank, distributed, identity, models, seeds
from .augment import crop_resize_flip, sample_crop_boxes, sample_flips
from .errors import UserError
from .fingerprint import file_sha256
from .imagefolder import IMAGE_FORMATS, Progress, class_folder, save_images
from .recipes import Recipe, add_recipe_arguments, recipe_from_args
from .stats import ClassBNStats
from .workdir import WorkDir

BATCHING = ("class-wise", "across-class")
BN_LOSSES = ("l2", "rms")
STATS = ("class", "global")
PIXEL_SPACES = ("normalized", "unit")
CROP_RATIO = (3 / 4, 4 / 3)
ACROSS_CLASS_BATCH = 100  # SRe2L's batch: 100 classes, one image each (SPEC.md section 3)


@dataclass(frozen=True)
class Job:
    """Images optimized together: one schedule, one random stream, one statistics row."""

    key: str  # file-system name of the unit of resume, e.g. "c00003" or "i0007-c00000"
    classes: tuple[int, ...]  # target class of each image
    indices: tuple[int, ...]  # index of each image within its class (its file name)
    stats_row: int  # row of the target tables: the class (class-wise) or 0 (global statistics)
    seed: int

    def __len__(self) -> int:
        return len(self.classes)


def plan_jobs(recipe: Recipe) -> list[Job]:
    """Class-wise: one job per class (its IPC images). Across-class: job (k, chunk) holds image k of
    up to ``ACROSS_CLASS_BATCH`` consecutive classes, as SRe2L's batches do."""
    cfg, num_classes = recipe.recover, recipe.data.num_classes
    if cfg.batching == "class-wise":
        global_stats = cfg.stats == "global"  # Table 4's "+C" ablation: class-wise batches, global statistics
        return [Job(class_folder(c, num_classes), (c,) * cfg.ipc, tuple(range(cfg.ipc)), 0 if global_stats else c,
                    seeds.derive(cfg.seed, 0, c)) for c in range(num_classes)]
    jobs = []
    for k in range(cfg.ipc):
        for start in range(0, num_classes, ACROSS_CLASS_BATCH):
            classes = tuple(range(start, min(start + ACROSS_CLASS_BATCH, num_classes)))
            key = f"i{k:04d}-{class_folder(start, num_classes)}"
            jobs.append(Job(key, classes, (k,) * len(classes), 0, seeds.derive(cfg.seed, 1, k, start)))
    return jobs


def check_recipe(recipe: Recipe) -> None:
    cfg = recipe.recover
    if cfg.ipc < 1:
        raise UserError(f"recover.ipc is {cfg.ipc}: it must be at least 1; pass --ipc N or --set recover.ipc=N")
    if cfg.iterations < 1:
        raise UserError(f"recover.iterations is {cfg.iterations}: it must be at least 1; pass --iterations N")
    for name, value, known in (("batching", cfg.batching, BATCHING), ("bn_loss", cfg.bn_loss, BN_LOSSES),
                               ("stats", cfg.stats, STATS),
                               ("pixel_space", cfg.pixel_space, PIXEL_SPACES),
                               ("image_format", cfg.image_format, tuple(IMAGE_FORMATS))):
        if value not in known:
            raise UserError(f"unknown recover.{name} {value!r}; choose one of: {', '.join(known)}")
    low, high = cfg.jitter
    if low > high:
        raise UserError(f"recover.jitter={cfg.jitter}: the roll range needs low <= high, e.g. --set recover.jitter=-4,4")
    if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
        raise UserError(f"recover.crop_scale={cfg.crop_scale}: needs 0 < low <= high <= 1, e.g. --set recover.crop_scale=0.08,1")
    if cfg.classes_per_step < 0:
        raise UserError(f"recover.classes_per_step is {cfg.classes_per_step}: use 0 (auto) or a positive count")


@dataclass(frozen=True)
class Targets:
    """The target tables mean/var [rows, sum of C] with every BN layer's columns side by side
    (``models.bn_layers`` order), as ``lpld_kernels.class_bn_loss_layers`` reads them, and the
    layer weights."""

    mean: torch.Tensor
    var: torch.Tensor
    weights: list[float]

    @classmethod
    def from_layers(cls, means: list[torch.Tensor], variances: list[torch.Tensor], weights: list[float]) -> "Targets":
        return cls(torch.cat(means, dim=1), torch.cat(variances, dim=1), weights)

    @classmethod
    def from_class_stats(cls, stats: ClassBNStats, layer_names: list[str], first_weight: float, device) -> "Targets":
        return cls.from_layers([stats.layers[n].mean.to(device) for n in layer_names],
                               [stats.layers[n].var.to(device) for n in layer_names],
                               _layer_weights(len(layer_names), first_weight))

    @classmethod
    def from_running_stats(cls, layers: list[torch.nn.BatchNorm2d], first_weight: float) -> "Targets":
        """The SRe2L targets: the teacher's global running statistics, a single row."""
        return cls.from_layers([bn.running_mean.detach().float()[None] for bn in layers],
                               [bn.running_var.detach().float()[None] for bn in layers],
                               _layer_weights(len(layers), first_weight))


def _layer_weights(count: int, first_weight: float) -> list[float]:
    return [first_weight] + [1.0] * (count - 1)


@dataclass(frozen=True)
class Options:
    """Speed options of the synthesis step; none of them changes the method."""

    compile: bool = False  # torch.compile the teacher forward (worth it on GPUs; measure first)
    channels_last: bool = False
    bf16: bool = False  # bf16 autocast of the teacher forward (CUDA only)


class Synthesizer:
    """Optimizes groups of images against the frozen teacher: the whole of SPEC.md section 3's loop."""

    def __init__(self, teacher: torch.nn.Module, targets: Targets, recipe: Recipe, device,
                 options: Options = Options()):
        cfg, data = recipe.recover, recipe.data
        self.teacher, self.targets, self.cfg, self.device = teacher, targets, cfg, torch.device(device)
        self.options = options
        self.shape = (data.channels, data.resolution, data.resolution)
        self.rms = cfg.bn_loss == "rms"
        dtype = next(teacher.parameters()).dtype
        mean = torch.tensor(data.mean, dtype=dtype, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(data.std, dtype=dtype, device=self.device).view(1, -1, 1, 1)
        self.mean, self.std, self.dtype = mean, std, dtype
        if cfg.pixel_space == "unit":  # optimize [0, 1] pixels; the teacher sees them normalized
            self.low, self.high = torch.zeros_like(mean), torch.ones_like(mean)
        else:  # optimize the teacher's input; clamp to what a [0, 1] pixel normalizes to
            self.low, self.high = (0 - mean) / std, (1 - mean) / std
        if options.channels_last:
            teacher.to(memory_format=torch.channels_last)
        self.bn_matching = lpld_kernels.BNStatisticsMatching(teacher, targets.mean, targets.var,
                                                             weights=targets.weights, rms=self.rms)
        # Compile the teacher forward only: the hooks are traced with it, the loss stays eager.
        self.forward = torch.compile(teacher, dynamic=False) if options.compile else teacher

    def objective(self, views, groups, labels, inverse_group_size, rows):
        """CE (mean within each group, summed over groups) + r_bn * sum_l w_l class BN loss_l (one fused op)."""
        if self.cfg.pixel_space == "unit":
            views = (views - self.mean) / self.std
        if self.options.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.options.bf16):
            logits = self.forward(views)
        cross_entropy = (F.cross_entropy(logits.float(), labels, reduction="none") * inverse_group_size).sum()
        bn = self.bn_matching(groups=groups, rows=rows)
        return cross_entropy + self.cfg.r_bn * bn

    def _views(self, images: torch.Tensor, generators, sizes) -> torch.Tensor:
        """This iteration's augmented copy: per job one crop box, one flip and one roll, drawn in that
        order from the job's own stream and shared by its images (SPEC.md section 3)."""
        _, height, width = self.shape
        low, high = self.cfg.jitter
        views = []
        for generator, part in zip(generators, images.split(sizes)):
            box = sample_crop_boxes(generator, 1, height, width, scale=self.cfg.crop_scale, ratio=CROP_RATIO)
            flip = sample_flips(generator, 1)
            shift = torch.randint(low, high + 1, (2,), generator=generator).tolist()
            # the group's images stacked as the channels of one image share the box and the flip
            view = crop_resize_flip(part.reshape(1, -1, height, width), box, flip, height).view_as(part)
            views.append(torch.roll(view, shifts=shift, dims=(2, 3)))
        return torch.cat(views)

    def run(self, jobs: list[Job]) -> torch.Tensor:
        """Optimize ``jobs`` together; return their last iterates as [0, 1] pixels [N, C, H, W], job order."""
        cfg, device = self.cfg, self.device
        generators = [torch.Generator().manual_seed(job.seed) for job in jobs]
        sizes = [len(job) for job in jobs]
        images = torch.cat([torch.randn(n, *self.shape, generator=g) for n, g in zip(sizes, generators)])
        images = images.to(device, self.dtype).requires_grad_(True)
        groups = torch.repeat_interleave(torch.arange(len(jobs)), torch.tensor(sizes)).to(device)
        labels = torch.tensor([c for job in jobs for c in job.classes], device=device)
        inverse_group_size = (1.0 / torch.tensor(sizes, dtype=torch.float32, device=device))[groups]
        rows = torch.tensor([job.stats_row for job in jobs], device=device)
        optimizer = torch.optim.Adam([images], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
        for t in range(cfg.iterations):
            optimizer.param_groups[0]["lr"] = 0.5 * (1 + math.cos(math.pi * t / cfg.iterations)) * cfg.lr
            loss = self.objective(self._views(images, generators, sizes), groups, labels, inverse_group_size, rows)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                images.clamp_(self.low, self.high)
        with torch.no_grad():
            pixels = images if cfg.pixel_space == "unit" else images * self.std + self.mean
            return pixels.clamp(0, 1).detach()


def auto_jobs_per_step(job_size: int, resolution: int, device: torch.device) -> int:
    """Jobs per forward when recover.classes_per_step is 0: an image budget in pixels.

    On a GPU about 256 images of 224x224 per 40 GiB (a ResNet-18 step that keeps its BN inputs fits
    with room to spare); on a CPU 128 images of 32x32, past which batching stops paying.
    """
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        budget = 256 * 224 * 224 * max(1.0, memory / 40 * 2**-30)
    else:
        budget = 128 * 32 * 32
    return max(1, int(budget // (job_size * resolution * resolution)))


def load_targets(recipe: Recipe, workdir: WorkDir, teacher: torch.nn.Module, teacher_fingerprint: str,
                 device) -> tuple[Targets, str | None]:
    """Class statistics for class-wise batching (refusing another teacher's), global ones for the
    across-class baseline and for ``recover.stats global``."""
    first = recipe.recover.first_bn_weight
    layers = models.bn_layers(teacher)
    if recipe.recover.batching == "across-class" or recipe.recover.stats == "global":
        return Targets.from_running_stats([layer for _, layer in layers], first), None
    stats = ClassBNStats.load(workdir.stats, model=teacher, num_classes=recipe.data.num_classes,
                              teacher_fingerprint=teacher_fingerprint)
    return Targets.from_class_stats(stats, [name for name, _ in layers], first, device), file_sha256(workdir.stats)


def recover(recipe: Recipe, workdir: WorkDir, device=None, options: Options = Options(),
            show_progress: bool = True) -> Path:
    """Synthesize ``recipe.recover.ipc`` images per class into ``workdir.distilled`` (an ImageFolder
    plus manifest.json, and the image bank once complete), skipping jobs an earlier run finished;
    ranks of torchrun share the jobs."""
    check_recipe(recipe)
    rank, world = distributed.init(device)
    device = distributed.device(device)
    teacher = models.load_teacher(workdir.teacher, recipe, device)
    teacher_fingerprint = models.model_fingerprint(teacher)
    targets, stats_fingerprint = load_targets(recipe, workdir, teacher, teacher_fingerprint, device)
    cfg, root = recipe.recover, workdir.distilled
    made_by = identity.of(recover={k: v for k, v in dataclasses.asdict(cfg).items() if k != "classes_per_step"},
                          data=recipe.settings("data")["data"], teacher_fingerprint=teacher_fingerprint,
                          statistics_fingerprint=stats_fingerprint)
    fields = {
        "format": "lpld-distilled/1", "recipe": recipe.to_dict(), "batching": cfg.batching,
        "num_classes": recipe.data.num_classes, "ipc": cfg.ipc, "image_format": cfg.image_format,
        "seeds": {"recover": cfg.seed, "job": "numpy SeedSequence([recover.seed, 0, class]) class-wise, "
                  "([recover.seed, 1, image index, first class]) across-class"},
        "options": dataclasses.asdict(options), "world_size": world,
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }
    with distributed.sole_writer(root):
        progress = Progress(root, recipe, made_by)
        jobs = plan_jobs(recipe)
        progress.read_manifest()  # every rank refuses a foreign tree before anyone writes
        distributed.barrier()
        if distributed.is_main():
            root.mkdir(parents=True, exist_ok=True)
            progress.write_manifest(fields, jobs)
        distributed.barrier()
        done = progress.completed(jobs)
        mine = [job for job in jobs if job.key not in done][rank::world]
        per_step = cfg.classes_per_step or auto_jobs_per_step(len(jobs[0]), recipe.data.resolution, device)
        synthesizer = Synthesizer(teacher, targets, recipe, device, options)
        start, images_done = time.perf_counter(), 0
        bar = tqdm(total=len(jobs), initial=len(done), unit="class" if cfg.batching == "class-wise" else "batch",
                   desc="recover", disable=not (show_progress and distributed.is_main()))
        for first in range(0, len(mine), per_step):
            step_jobs = mine[first:first + per_step]
            step_start = time.perf_counter()
            pixels = synthesizer.run(step_jobs)
            seconds = time.perf_counter() - step_start
            for job, job_pixels in zip(step_jobs, pixels.split([len(job) for job in step_jobs])):
                save_images(root, job, job_pixels, recipe)
                progress.record(rank, job, seconds / len(step_jobs))
            images_done += sum(len(job) for job in step_jobs)
            bar.update(len(step_jobs) * world)
            bar.set_postfix(img_per_s=f"{images_done * world / (time.perf_counter() - start):.2f}")
        bar.close()
        synthesizer.bn_matching.remove()
        distributed.barrier()
        if distributed.is_main():
            manifest = progress.write_manifest(fields, jobs)
            elapsed = time.perf_counter() - start
            fresh = sum(entry["images"] for key, entry in manifest["completed"].items() if key not in done)
            print(f"recover: {len(manifest['completed'])}/{len(jobs)} {cfg.batching} jobs complete; this run "
                  f"{fresh} images x {cfg.iterations} iterations in {elapsed:.1f} s ({fresh / max(elapsed, 1e-9):.2f} "
                  f"images/s, {fresh * cfg.iterations / max(elapsed, 1e-9):.0f} image-iterations/s) -> {root}")
            if manifest["complete"]:
                bank.refresh(root, recipe.data.channels)
        return root


def register(subparsers) -> None:
    parser = subparsers.add_parser("recover", help="synthesize the distilled images (class-wise BN matching)")
    add_recipe_arguments(parser)
    parser.add_argument("--batching", choices=BATCHING, help="class-wise (LPLD, default) or across-class (SRe2L)")
    parser.add_argument("--stats", choices=STATS,
                        help="class-wise batches match class statistics (LPLD, default) or the teacher's global ones "
                             "(the paper's Table 4 '+C' ablation)")
    parser.add_argument("--ipc", type=int, help="images per class (recover.ipc)")
    parser.add_argument("--iterations", type=int, help="optimization steps per image group (recover.iterations)")
    parser.add_argument("--classes-per-step", type=int, help="classes per teacher forward; 0 = auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the synthesis step (GPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast of the teacher forward (GPU)")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> None:
    overrides = [f"recover.{field}={value}" for field, value in (
        ("batching", args.batching), ("stats", args.stats), ("ipc", args.ipc), ("iterations", args.iterations),
        ("classes_per_step", args.classes_per_step)) if value is not None]
    args.overrides = overrides + args.overrides
    recipe = recipe_from_args(args)
    options = Options(compile=args.compile, channels_last=args.channels_last, bf16=args.bf16)
    recover(recipe, WorkDir.for_recipe(args.workdir, recipe.name), args.device, options)

"""Relabel: the teacher's soft labels on E epochs of augmented distilled batches (SPEC.md section 4).

Per epoch e a generator seeded from (seed, e) draws the image order, then for each of the
nb = N // B batches the crops, flips (or IN-21K cutouts) and the CutMix, in that order. So any
epoch can be regenerated alone: a resumed run, another rank, or a later audit get the same
records (SPEC.md section 11.11). The teacher sees ``augment.replay(record)``, the very call that
training makes, and its raw logits are stored as fp16 (full K, no temperature).

Writing is streamed into the preallocated store and committed epoch by epoch, so an interrupted
run resumes from its last complete epoch. Under torchrun the ranks take turns over the rows of
each epoch and write them into the same memmaps; the result equals a single-process run.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed
from .augment import Record, replay, sample_crop_boxes, sample_cutmix, sample_cutout, sample_flips
from .errors import UserError
from .labels import GIB, PARTIAL_BATCH_RULE, LabelStore, LabelStoreWriter, storage_report
from .recipes import Recipe, add_recipe_arguments, recipe_from_args
from .workdir import WorkDir


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A torch generator whose stream depends on (seed, epoch) only (numpy's SeedSequence mixing)."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def epoch_records(header: dict, epoch: int) -> list[Record]:
    """The nb augmentation records of ``epoch`` (no logits yet), regenerated from the header's seed."""
    generator = epoch_generator(header["seeds"]["relabel"], epoch)
    batch, (height, width), size = header["batch_size"], header["image_size"], header["size"]
    order = torch.randperm(header["num_images"], generator=generator).numpy().astype(np.int32)
    records = []
    for b in range(header["batches_per_epoch"]):
        record = Record(img_idx=order[b * batch : (b + 1) * batch],
                        crop=sample_crop_boxes(generator, batch, height, width, header["crop_scale"]),
                        flip=np.zeros(batch, dtype=bool))
        if header["flip"] == "cutout":
            record.cutout = sample_cutout(generator, batch, size, size, header["channels"])
        else:
            record.flip = sample_flips(generator, batch)
        if header["mix"] == "cutmix":
            mix = sample_cutmix(generator, batch, size, size)
            record.mix_perm, record.mix_lam, record.mix_box = mix.perm, mix.lam, mix.box
        records.append(record)
    return records


def label_header(recipe: Recipe, images: torch.Tensor, dataset_fingerprint: str, teacher_fingerprint: str,
                 topk: int = 0) -> dict:
    """Everything a label store records about how it was made (the meta minus array checksums).

    ``topk`` > 0 keeps only the k largest logits per sample (values + class indices; the rest
    read back as -inf). Off by default: the paper stores full K, and LPLD's point is that pruning
    whole records already gives 10-100x.
    """
    config = recipe.relabel
    if not 0 <= topk <= recipe.data.num_classes:
        raise UserError(f"--topk {topk}: must be between 0 (full logits) and the class count {recipe.data.num_classes}")
    if config.flip not in ("flip", "cutout") or config.mix not in ("cutmix", "none"):
        raise UserError(f"relabel.flip={config.flip!r}, relabel.mix={config.mix!r}: "
                        "flip must be flip or cutout and mix must be cutmix or none")
    if config.epochs < 1:
        raise UserError(f"relabel.epochs={config.epochs}: generate at least one epoch")
    num_images, channels, height, width = images.shape
    if config.batch_size < 1 or num_images < config.batch_size:
        raise UserError(f"{num_images} distilled images cannot fill one batch of relabel.batch_size="
                        f"{config.batch_size} (partial batches are not labelled); lower the batch size")
    return {
        "num_images": num_images, "channels": channels, "image_size": [height, width],
        "batch_size": config.batch_size, "num_classes": recipe.data.num_classes, "epochs": config.epochs,
        "batches_per_epoch": num_images // config.batch_size, "partial_batches": PARTIAL_BATCH_RULE,
        "size": recipe.data.resolution, "mean": list(recipe.data.mean), "std": list(recipe.data.std),
        "crop_scale": list(config.crop_scale), "flip": config.flip, "mix": config.mix,
        "seeds": {"relabel": config.seed}, "logits_dtype": "float16", "topk": topk, "prune": [],
        "dataset_fingerprint": dataset_fingerprint, "teacher_fingerprint": teacher_fingerprint,
        "recipe": recipe.settings("data", "model", "relabel"),
    }


def generate(teacher: nn.Module, images: torch.Tensor, out: str | Path, header: dict,
             ids: np.ndarray | None = None, device: torch.device | str = "cpu") -> Path:
    """Write the records ``ids`` (default: all E * nb) into the store ``out``; resumes if present.

    ``images`` are the distilled images, uint8 [N, C, H, W] on the CPU; each batch is gathered,
    augmented and labelled on ``device``.
    """
    nb = header["batches_per_epoch"]
    ids = np.arange(header["epochs"] * nb, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    rank, world = distributed.rank(), distributed.world_size()
    writer = LabelStoreWriter(out, header, ids) if rank == 0 else None
    distributed.barrier()
    writer = writer or LabelStoreWriter(out, header, ids)
    rows_per_epoch = {e: rows[rank::world] for e in range(header["epochs"])
                      if e not in writer.complete_epochs and len(rows := writer.rows_of_epoch(e))}
    todo = list(rows_per_epoch)
    teacher.eval()
    bar = tqdm(total=sum(map(len, rows_per_epoch.values())) * header["batch_size"], unit="img",
               desc="relabel", disable=not distributed.is_main())
    with torch.inference_mode():
        for epoch in todo:
            records = epoch_records(header, epoch)
            for row in rows_per_epoch[epoch]:
                record = records[ids[row] % nb]
                batch = replay(images, record, header["size"], header["mean"], header["std"], device)
                record.logits = teacher(batch).to(torch.float16).cpu().numpy()
                if record.logits.shape != (len(batch), header["num_classes"]):
                    raise UserError(f"the teacher outputs {tuple(record.logits.shape)} for a batch of {len(batch)}, "
                                    f"expected {header['num_classes']} classes (data.num_classes); use the matching teacher")
                writer.write(row, record)
                bar.update(len(batch))
            writer.flush()
            distributed.barrier()
            if rank == 0:
                writer.mark_epoch_complete(epoch)
    bar.close()
    distributed.barrier()
    if rank == 0:
        writer.finish()
    distributed.barrier()
    return Path(out)


def relabel(recipe: Recipe, workdir: WorkDir, device: torch.device | str, only_kept: bool = False,
            topk: int = 0) -> Path:
    """``lpld relabel``: label the distilled images in workdir with its teacher.

    ``only_kept`` writes just the records that ``lpld prune`` would keep at recipe.prune (ratio,
    pool, seed) into the pruned store's directory: the paper's "less label" runs, which never
    generate the other records at all.
    """
    from . import bank, models, prune

    start = time.perf_counter()
    distributed.init()
    distilled = bank.open(workdir.distilled, recipe.data.channels)
    teacher = models.load_teacher(workdir.teacher, recipe, device)
    header = label_header(recipe, distilled.images, distilled.fingerprint, models.model_fingerprint(teacher), topk)
    ids, out = None, workdir.labels
    if only_kept:
        config = recipe.prune
        total = header["epochs"] * header["batches_per_epoch"]
        ids = prune.select_pool(np.arange(total), header["batches_per_epoch"], config.ratio, config.pool, config.seed)
        header = prune.pruned_header(header, config.ratio, config.pool, config.seed)
        out = prune.pruned_path(workdir, config.ratio)
    generate(teacher, distilled.images, out, header, ids, device)
    if distributed.is_main():
        store = LabelStore.open(out, verify_checksums=False)
        size = storage_report(store)["bytes_on_disk"]
        print(f"relabel: {len(store)} records ({len(store) * header['batch_size']} images) -> {out}: "
              f"{size:,d} bytes = {size / GIB:.4f} GiB in {time.perf_counter() - start:.1f} s")
    return Path(out)


def _command(args: argparse.Namespace) -> None:
    recipe = recipe_from_args(args)
    workdir = WorkDir.for_recipe(args.workdir, recipe.name)
    relabel(recipe, workdir, distributed.device(args.device), args.generate_only_kept, args.topk)


def register(subparsers) -> None:
    parser = subparsers.add_parser("relabel", help="store the teacher's soft labels on augmented distilled batches")
    add_recipe_arguments(parser)
    parser.add_argument("--generate-only-kept", action="store_true",
                        help="write only the records that prune keeps at recipe.prune.ratio/pool/seed (scored pools need full labels)")
    parser.add_argument("--topk", type=int, default=0,
                        help="store only the k largest logits per sample (extension; default 0 = full fp16 logits, as the paper)")
    parser.set_defaults(func=_command)

"""Relabel: the teacher's soft labels on E epochs of augmented distilled batches (SPEC.md section 4).

Per epoch e a generator seeded from (seed, e) draws the image order, then for each of the
nb = N // B batches the crops, flips (or IN-21K cutouts) and the CutMix, in that order. So any
epoch can be regenerated alone: a resumed run, another rank, or a later audit get the same
records (SPEC.md section 11.11). The teacher sees ``augment.replay(record)``, the very call that
training makes, and its raw logits are stored as fp16 (full K, no temperature).

Writing is streamed into the preallocated store and committed epoch by epoch, so an interrupted
run resumes from its last complete epoch. Under torchrun the ranks take turns over the rows of
each epoch and write them into the same memmaps; the result equals a single-process run.

Throughput: several records share one teacher forward (about ``--images-per-forward`` images).
The teacher is in eval mode, so its BatchNorm uses running statistics and the records of one
forward do not interact: each gets the logits of a forward of its own (to float rounding).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed, seeds
from .augment import Record, replay, sample_crop_boxes, sample_cutmix, sample_cutout, sample_flips
from .errors import UserError
from .codecs import LogitCodec, add_codec_arguments, codec_from_args
from .labels import GIB, PARTIAL_BATCH_RULE, LabelStore, LabelStoreWriter, storage_report
from .recipes import Recipe, add_recipe_arguments, recipe_from_args
from .workdir import WorkDir

IMAGES_PER_FORWARD = 256  # IN-21K's records of 32 images -> 8 records per teacher forward


def epoch_records(header: dict, epoch: int) -> list[Record]:
    """The nb augmentation records of ``epoch`` (no logits yet), regenerated from the header's seed."""
    generator = seeds.torch_generator(header["seeds"]["relabel"], epoch)
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
                 codec: LogitCodec = LogitCodec()) -> dict:
    """Everything a label store records about how it was made (the meta minus array checksums).

    ``codec`` keeps fewer or narrower logits (top-k, int8, fp8; see ``codecs.LogitCodec``). The
    default is the paper's full fp16 logits: LPLD's point is that pruning whole records already
    gives 10-100x, and the codecs compose with it.
    """
    config = recipe.relabel
    codec.check(recipe.data.num_classes)
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
        "seeds": {"relabel": config.seed}, **codec.meta(), "prune": [],
        "dataset_fingerprint": dataset_fingerprint, "teacher_fingerprint": teacher_fingerprint,
        "recipe": recipe.settings("data", "model", "relabel"),
    }


def choose_records_per_forward(images_per_forward: int, batch_size: int) -> int:
    """Records stacked into one teacher forward: about ``images_per_forward`` images, at least one record."""
    if images_per_forward < 1:
        raise UserError(f"--images-per-forward {images_per_forward}: use a positive image count, e.g. {IMAGES_PER_FORWARD}")
    return max(1, round(images_per_forward / batch_size))


def _copy_to_host(logits: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying ``logits`` into pinned host memory; the event marks when the copy has landed
    (None on the CPU, where the logits already are on the host)."""
    if logits.device.type != "cuda":
        return logits, None
    host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
    host.copy_(logits, non_blocking=True)
    landed = torch.cuda.Event()
    landed.record(torch.cuda.current_stream(logits.device))
    return host, landed


class _StoreFeed:
    """The host end of relabel's pipeline. Each forward's logits are written one forward later,
    once their copy has landed, so the device never waits for the host or the disk; an epoch is
    committed (flush, barrier, progress.json, in epoch order on every rank) once this rank has
    written all its rows of it."""

    def __init__(self, writer: LabelStoreWriter, rows_per_epoch: dict[int, np.ndarray], batch_size: int):
        self.writer, self.batch_size = writer, batch_size
        self.epochs = collections.deque(rows_per_epoch)
        self.ends = collections.deque(np.cumsum([len(rows) for rows in rows_per_epoch.values()], dtype=np.int64).tolist())
        self.in_flight = collections.deque()
        self.written = 0

    def put(self, rows: list[int], records: list[Record], logits: torch.Tensor) -> None:
        """Queue one forward's fp16 logits [len(rows) * B, K]; write the forward queued before it."""
        self.in_flight.append((rows, records, *_copy_to_host(logits)))
        if len(self.in_flight) > 1:
            self._write_oldest()

    def finish(self) -> None:
        while self.in_flight:
            self._write_oldest()
        self._commit()

    def _write_oldest(self) -> None:
        rows, records, logits, landed = self.in_flight.popleft()
        if landed is not None:
            landed.synchronize()
        for i, (row, record) in enumerate(zip(rows, records)):  # a copy: cached records must not pin the logits
            mine = logits[i * self.batch_size:(i + 1) * self.batch_size].numpy()
            self.writer.write(row, dataclasses.replace(record, logits=mine))
        self.written += len(rows)
        self._commit()

    def _commit(self) -> None:
        if self.epochs and self.ends[0] <= self.written:
            self.writer.flush()  # once for all the epochs this write completes
        while self.epochs and self.ends[0] <= self.written:
            distributed.barrier()
            if distributed.rank() == 0:
                self.writer.mark_epoch_complete(self.epochs[0])
            self.epochs.popleft()
            self.ends.popleft()


def thread_initializer(device: torch.device | str):
    """What a helper thread runs first to work on ``device``: a thread's current CUDA device is its
    own, so the thread preparing relabel's batches must be put on the teacher's GPU (by index)."""
    device = distributed.device(device)
    return functools.partial(torch.cuda.set_device, device) if device.type == "cuda" else None


def generate(teacher: nn.Module, images: torch.Tensor, out: str | Path, header: dict,
             ids: np.ndarray | None = None, device: torch.device | str = "cpu", records_per_forward: int = 1) -> Path:
    """Write the records ``ids`` (default: all E * nb) into the store ``out``; resumes if present.

    ``images`` are the distilled images, uint8 [N, C, H, W] on the CPU; each batch is gathered,
    augmented and labelled on ``device``, ``records_per_forward`` records per teacher forward
    (consecutive rows of this rank, across epoch ends). A background thread draws and replays
    the next forward's records while the teacher runs on these; logits reach the store one
    forward later (``_StoreFeed``).
    """
    if records_per_forward < 1:
        raise UserError(f"records_per_forward={records_per_forward}: stack at least one record per forward")
    nb, batch_size, device = header["batches_per_epoch"], header["batch_size"], distributed.device(device)
    ids = np.arange(header["epochs"] * nb, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    with distributed.sole_writer(out):
        rank, world = distributed.rank(), distributed.world_size()
        writer = LabelStoreWriter(out, header, ids) if rank == 0 else None
        distributed.barrier()
        writer = writer or LabelStoreWriter(out, header, ids)
        rows_per_epoch = {e: rows[rank::world] for e in range(header["epochs"])
                          if e not in writer.complete_epochs and len(rows := writer.rows_of_epoch(e))}
        work = [(epoch, int(row)) for epoch, rows in rows_per_epoch.items() for row in rows]
        chunks = [work[i:i + records_per_forward] for i in range(0, len(work), records_per_forward)]

        @functools.lru_cache(maxsize=2)  # rows come in epoch order: the current epoch and the next
        def records_of_epoch(epoch: int) -> list[Record]:
            return epoch_records(header, epoch)

        def prepare(chunk: list[tuple[int, int]]) -> tuple[list[int], list[Record], torch.Tensor]:
            with torch.inference_mode():
                records = [records_of_epoch(epoch)[ids[row] % nb] for epoch, row in chunk]
                batch = torch.cat([replay(images, record, header["size"], header["mean"], header["std"], device)
                                   for record in records])
            return [row for _, row in chunk], records, batch

        teacher.eval()
        feed = _StoreFeed(writer, rows_per_epoch, batch_size)
        bar = tqdm(total=len(work) * batch_size, unit="img", desc="relabel", disable=not distributed.is_main())
        with torch.inference_mode(), ThreadPoolExecutor(max_workers=1, initializer=thread_initializer(device)) as pool:
            upcoming = pool.submit(prepare, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                rows, records, batch = upcoming.result()
                if k + 1 < len(chunks):
                    upcoming = pool.submit(prepare, chunks[k + 1])
                logits = teacher(batch)
                if logits.shape != (len(batch), header["num_classes"]):
                    raise UserError(f"the teacher outputs {tuple(logits.shape)} for a batch of {len(batch)}, "
                                    f"expected {header['num_classes']} classes (data.num_classes); use the matching teacher")
                feed.put(rows, records, logits.to(torch.float16))
                bar.update(len(batch))
            feed.finish()
        bar.close()
        distributed.barrier()
        if rank == 0:
            writer.finish()
        distributed.barrier()
        return Path(out)


def relabel(recipe: Recipe, workdir: WorkDir, device: torch.device | str, only_kept: bool = False,
            codec: LogitCodec = LogitCodec(), images_per_forward: int = IMAGES_PER_FORWARD) -> Path:
    """``lpld relabel``: label the distilled images in workdir with its teacher.

    ``only_kept`` writes just the records that ``lpld prune`` would keep at recipe.prune (ratio,
    pool, seed) into the pruned store's directory: the paper's "less label" runs, which never
    generate the other records at all. ``images_per_forward`` sets how many records share a
    teacher forward (a speed setting: the store does not record it, and a resume may change it).
    """
    from . import bank, models, prune

    start = time.perf_counter()
    distributed.init(device)
    device = distributed.device(device)
    distilled = bank.open(workdir.distilled, recipe.data.channels)
    teacher = models.load_teacher(workdir.teacher, recipe, device)
    header = label_header(recipe, distilled.images, distilled.fingerprint, models.model_fingerprint(teacher), codec)
    ids, out = None, workdir.labels
    if only_kept:
        config = recipe.prune
        total = header["epochs"] * header["batches_per_epoch"]
        ids = prune.select_pool(np.arange(total), header["batches_per_epoch"], config.ratio, config.pool, config.seed)
        header = prune.pruned_header(header, config.ratio, config.pool, config.seed)
        out = prune.pruned_path(workdir, config.ratio)
    generate(teacher, distilled.images, out, header, ids, device,
             choose_records_per_forward(images_per_forward, header["batch_size"]))
    if distributed.is_main():
        store = LabelStore.open(out, verify_checksums=False)
        size = storage_report(store)["bytes_on_disk"]
        print(f"relabel: {len(store)} records ({len(store) * header['batch_size']} images) -> {out}: "
              f"{size:,d} bytes = {size / GIB:.4f} GiB in {time.perf_counter() - start:.1f} s")
    return Path(out)


def _command(args: argparse.Namespace) -> None:
    recipe = recipe_from_args(args)
    workdir = WorkDir.for_recipe(args.workdir, recipe.name)
    relabel(recipe, workdir, distributed.device(args.device), args.generate_only_kept, codec_from_args(args),
            args.images_per_forward)


def register(subparsers) -> None:
    parser = subparsers.add_parser("relabel", help="store the teacher's soft labels on augmented distilled batches")
    add_recipe_arguments(parser)
    parser.add_argument("--generate-only-kept", action="store_true",
                        help="write only the records that prune keeps at recipe.prune.ratio/pool/seed (scored pools need full labels)")
    add_codec_arguments(parser)
    parser.add_argument("--images-per-forward", type=int, default=IMAGES_PER_FORWARD,
                        help=f"stack records into teacher forwards of about this many images (default {IMAGES_PER_FORWARD}: "
                             "8 records of IN-21K's 32); speed only: the labels are those of one record per "
                             "forward, to float rounding (bit for bit on the CPU; a GPU may pick another "
                             "convolution algorithm for another batch size)")
    parser.set_defaults(func=_command)

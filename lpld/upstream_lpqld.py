"""``lpld import labels`` for LPQLD's soft-label directories (the TPAMI'26 follow-up's released labels).

LPQLD (he-y/soft-label-pruning-quantization-for-dataset-distillation) writes one flat folder: files
``batch_<n>.tar`` for n = 0..N-1 counted across epochs, so record n is batch n % nb of epoch n // nb,
and ``sampler_indices_batch.json`` mapping n to the image indices of that batch in order. Each file
is LPLD's batch list with LPQLD's top-k logits in place of the full ones: [crop coords fp16 [B, 4],
flips bool [B] (ImageNet-21K: cutouts float32 [B, 7]), CutMix index uint8 [B] or None, lambda or
None, box as 4 uint8 scalars or None, top-k logits fp16 [B, k], their class indices int16 [B, k]]
(six entries, full logits last, when it kept them all). LPQLD's own loader unpickles them with
``weights_only=False``; here they go through ``torchfiles.load_plain`` like every import.

The top-k values become a top-k store value for value, decoded as MR (the other classes at -inf),
which is how LPQLD trains on them (its MR-k). Crop coords are fp16 here, so a box is recovered by
rounding to within fp16's resolution rather than upstream's float32 1e-3 px. A pruned run holds
fewer files than its ratio says: its generator writes whole epochs of nb batches but lowers its
total by one after every epoch (2310 files rather than 2340 at ImageNet-1K IPC 10 and ratio 0.9),
so the store keeps the records that exist and records the ratio given; partial last batches (ratio 0 keeps them) are dropped, as in every lpld store.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import distributed, models
from .codecs import LogitCodec
from .errors import UserError
from .labels import GIB
from .prune import pruned_header, pruned_path
from .recipes import Recipe
from .relabel import label_header
from .torchfiles import load_plain
from .upstream_labels import convert_batch, distilled_with_map, import_writer
from .workdir import WorkDir

ORDER_JSON = "sampler_indices_batch.json"
FLAT_BATCH = re.compile(r"batch_(\d+)\.tar")


def is_lpqld_directory(root: Path) -> bool:
    """LPQLD's layout: its per-batch order file, or batch files directly in the folder."""
    return (root / ORDER_JSON).is_file() or any(FLAT_BATCH.fullmatch(name) for name in os.listdir(root))


def dense_logits(batch: list, num_classes: int, where: str) -> list:
    """LPQLD's 7-entry list as LPLD's 6-entry one: the top-k logits scattered into -inf (MR)."""
    if len(batch) == 6:
        return batch
    if len(batch) != 7:
        raise UserError(f"{where}: expected LPQLD's list of 7 entries (..., top-k logits, top-k indices) or 6 "
                        f"(..., logits), found {len(batch)}")
    values, indices = batch[5], batch[6]
    if not (isinstance(values, torch.Tensor) and isinstance(indices, torch.Tensor)) or values.shape != indices.shape \
            or values.ndim != 2 or indices.dtype.is_floating_point:
        raise UserError(f"{where}: top-k logits and indices should be tensors of one shape [B, k], integer indices")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_classes):
        raise UserError(f"{where}: top-k class indices outside [0, {num_classes}); check --set data.num_classes")
    dense = torch.full((values.shape[0], num_classes), float("-inf"), dtype=torch.float16)
    return [*batch[:5], dense.scatter(1, indices.long(), values.to(torch.float16))]


def import_lpqld_labels(path: str | Path, recipe: Recipe, workdir: WorkDir, out: str | Path | None = None,
                        ratio: float | None = None) -> Path:
    """An LPQLD soft-label directory -> our label store (top-k when the files are, pruned when
    fewer than relabel.epochs x nb records exist; ``ratio`` is then LPQLD's --prune_ratio)."""
    started, root = time.perf_counter(), Path(path)
    files = {int(m.group(1)): root / name for name in os.listdir(root) if (m := FLAT_BATCH.fullmatch(name))}
    if not files or sorted(files) != list(range(len(files))):
        raise UserError(f"{root}: expected batch_0.tar ... batch_<N-1>.tar with none missing (LPQLD's layout)")
    try:
        orders = json.loads((root / ORDER_JSON).read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{root / ORDER_JSON}: LPQLD's record of each batch's images is unreadable ({error})") from None
    distilled, mapping = distilled_with_map(workdir, recipe.data.channels)
    num_classes, num_images = recipe.data.num_classes, len(distilled.images)
    first = load_plain(files[0])
    if not isinstance(first, (list, tuple)) or len(first) not in (6, 7) or not isinstance(first[0], torch.Tensor):
        raise UserError(f"{files[0]}: not LPQLD's batch list (coords, flips, mix index, lambda, box, logits[, indices])")
    batch_size, topk = len(first[0]), first[5].shape[-1] if len(first) == 7 else 0
    nb = num_images // batch_size
    per_epoch = nb + (1 if ratio in (None, 0) and num_images % batch_size else 0)  # LPQLD keeps partial ones at 1x
    kept = [(n, n // per_epoch * nb + n % per_epoch) for n in sorted(files) if n % per_epoch < nb]
    total = recipe.relabel.epochs * nb
    if kept[-1][1] >= total:
        raise UserError(f"{root} holds records past relabel.epochs={recipe.relabel.epochs} epochs of {nb}; pass "
                        f"--set relabel.epochs=E")
    recipe = dataclasses.replace(recipe, relabel=dataclasses.replace(recipe.relabel, batch_size=batch_size))
    teacher = models.read_teacher_meta(workdir.teacher)["fingerprint"] if workdir.teacher.is_file() else None
    header = dict(label_header(recipe, distilled.images, distilled.fingerprint, teacher, LogitCodec(topk)),
                  seeds={"relabel": None},
                  imported_from={"path": os.path.abspath(root), "format": "lpqld", "order": ORDER_JSON,
                                 "files": len(files), "partial_batches_dropped": len(files) - len(kept)})
    if len(kept) < total:
        if not ratio:
            raise UserError(f"{root} holds {len(kept)} of {total} records: a pruned LPQLD run; pass --ratio R (its "
                            "--prune_ratio), or --set relabel.epochs=E for fewer epochs")
        header, out = pruned_header(header, ratio, "random", 0), out or pruned_path(workdir, ratio)
    out = Path(out or workdir.labels)
    layout = {key: header[key] for key in ("size", "num_classes", "batch_size", "channels", "image_size", "flip", "mix")}
    layout["coords_tolerance"] = max(layout["image_size"]) * 2.0**-11  # fp16 coords: within fp16's resolution
    with distributed.sole_writer(out):
        writer = import_writer(out, header, np.array([g for _, g in kept], dtype=np.int64))
        for row, (n, g) in enumerate(tqdm(kept, unit="batch", desc="import labels")):
            if g // nb in writer.complete_epochs:  # an interrupted import resumes here
                continue
            where = str(files[n])
            record, _ = convert_batch(dense_logits(load_plain(files[n]), num_classes, where), where, layout)
            images = np.asarray(orders.get(str(n), []), dtype=np.int64)
            if images.shape != (batch_size,) or images.min() < 0 or images.max() >= num_images:
                raise UserError(f"{root / ORDER_JSON}: batch {n} should list {batch_size} image indices in "
                                f"[0, {num_images})")
            record.img_idx = mapping[images].astype(np.int32)
            writer.write(row, record)
            if g % nb == nb - 1 or row == len(kept) - 1:
                writer.flush()
                writer.mark_epoch_complete(g // nb)
        writer.finish()
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"import labels: {len(kept)} of LPQLD's {len(files)} records ({'top-' + str(topk) if topk else 'full'} "
          f"logits, {batch_size} images each) from {root} -> {out}: {size:,d} bytes = {size / GIB:.4f} GiB in "
          f"{time.perf_counter() - started:.1f} s")
    return out

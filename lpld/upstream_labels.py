"""``lpld import labels``: upstream's soft-label directories converted into our label store.

Upstream (he-y/soft-label-pruning-for-dataset-distillation, SPEC.md sections 4-5) writes the FKD
records of relabelling as torch files; every one is read through ``torchfiles.load_plain`` (no
code runs) and written through ``LabelStoreWriter`` with the identity fields training checks.
Upstream's labels index its own image listing, so ``lpld import images`` must come first (its
manifest maps upstream's image indices to ours).

Facts used (read from upstream's code, SPEC.md):
- labels: ``epoch_{e}/batch_{b}.tar`` = torch.save of [coords float32 [B, 4] (top/H, left/W, h/H,
  w/W of the distilled image), flip bool [B] (ImageNet-21K-P: cutout float32 [B, 7] = (cy/S, cx/S,
  hc/S, wc/S, r, g, b) on the S x S crop), CutMix permutation int64 [B] or None, lambda float or
  None, box [x1, y1, x2, y2] of numpy int64 (x indexes image rows) or None, logits fp16/fp32 [B, K]].
  The image order of a batch is not stored: it is batch b of epoch e of a DataLoader over
  ``RandomSampler(generator=torch.Generator().manual_seed(42))`` that keeps one generator across
  epochs; ``sampler_indices_epoch.json`` (when present) lists it.
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

from . import bank, distributed, models
from .augment import Cutout, Record
from .errors import UserError
from .imagefolder import MANIFEST
from .labels import GIB, META, LabelStoreWriter
from .prune import kept_count, pruned_header, pruned_path
from .recipes import Recipe
from .relabel import label_header
from .torchfiles import load_plain, numpy_int64_globals
from .workdir import WorkDir

UPSTREAM_ORDER_SEED = 42  # upstream's --fkd-seed
INTEGER_TOLERANCE = 1e-3  # pixels: a float32 i/H times H lands within ~H * 6e-8 of i
EPOCH_DIR = re.compile(r"epoch_(\d+)")
BATCH_FILE = re.compile(r"batch_(\d+)\.tar")
ORDER_JSON = "sampler_indices_epoch.json"


def upstream_orders(num_images: int, epochs: int, seed: int = UPSTREAM_ORDER_SEED):
    """Upstream's image order of each epoch, regenerated: one ``RandomSampler`` with a generator
    seeded once, iterated to its end per epoch (as its DataLoader does). Exact only where torch's
    RandomSampler consumes the generator as the torch upstream ran did (SPEC.md section 9.3)."""
    sampler = torch.utils.data.RandomSampler(range(num_images), generator=torch.Generator().manual_seed(seed))
    for _ in range(epochs):  # to the end: the sampler draws again after its last index (torch >= 1.11)
        yield np.asarray(list(sampler), dtype=np.int64)


def pixel_boxes(coords: torch.Tensor, height: int, width: int, where: str,
                tolerance: float = INTEGER_TOLERANCE) -> np.ndarray:
    """Upstream's normalized crops (top/H, left/W, h/H, w/W) as our int (top, left, h, w).

    Upstream made them from integer boxes of the distilled image, i/H in float32, and replays
    ``coords * H`` through PIL's crop, which rounds the box edges; rounding recovers the integers
    exactly, and a value further than ``tolerance`` px from one is refused (images of another
    size, or not upstream's crops; LPQLD's fp16 coords allow more).
    """
    scaled = coords.double().numpy() * np.array([height, width, height, width], dtype=np.float64)
    boxes = _exact_integers(scaled, where, f"crop coords x ({height}, {width}, {height}, {width}) are not integer "
                            "pixels: were the labels made from images of this size?", tolerance)
    top, left, h, w = boxes.T
    if (top < 0).any() or (left < 0).any() or (h < 1).any() or (w < 1).any() or (top + h > height).any() \
            or (left + w > width).any():
        raise UserError(f"{where}: a crop box falls outside the {height}x{width} distilled image")
    return boxes


def _exact_integers(values: np.ndarray, where: str, problem: str, tolerance: float = INTEGER_TOLERANCE) -> np.ndarray:
    rounded = np.rint(values)
    off = np.abs(values - rounded)
    if off.size and off.max() > tolerance:
        raise UserError(f"{where}: {problem} (off by up to {off.max():.4g})")
    return rounded.astype(np.int64)


def cutout_boxes(params: torch.Tensor, size: int, channels: int, where: str) -> Cutout:
    """ImageNet-21K-P cutout (cy/S, cx/S, hc/S, wc/S, r, g, b) on the S x S crop as our record.

    Upstream paints ``[x1, y1, x2, y2]`` with PIL's rectangle, which includes both corners, with
    y1 = clip(cy - hc // 2, 0, S), y2 = clip(cy + hc // 2, 0, S); our box is half-open, so its
    ends are min(y2 + 1, S) and min(x2 + 1, S).
    """
    if channels != 3:
        raise UserError(f"{where}: a cutout record has an RGB fill, but the images have {channels} channel(s)")
    values = params.double().numpy() * np.array([size, size, size, size, 1, 1, 1], dtype=np.float64)
    ints = _exact_integers(values, where, f"cutout values x {size} are not integers: were the labels made at size {size}?")
    cy, cx, hc, wc = ints[:, 0], ints[:, 1], ints[:, 2], ints[:, 3]
    fill = ints[:, 4:7]
    if fill.min(initial=0) < 0 or fill.max(initial=0) > 255:
        raise UserError(f"{where}: cutout fill outside 0..255")
    y1, y2 = np.clip(cy - hc // 2, 0, size), np.clip(cy + hc // 2, 0, size)
    x1, x2 = np.clip(cx - wc // 2, 0, size), np.clip(cx + wc // 2, 0, size)
    box = np.stack([y1, np.minimum(y2 + 1, size), x1, np.minimum(x2 + 1, size)], axis=1)
    return Cutout(box=box.astype(np.int32), fill=fill.astype(np.uint8))


def _int_value(value, where: str) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        return int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    raise UserError(f"{where}: expected an integer, found {type(value).__name__}")


def convert_batch(batch, where: str, layout: dict) -> tuple[Record, str]:
    """One upstream batch list as our Record (img_idx left empty) and its logits dtype."""
    size, num_classes, batch_size = layout["size"], layout["num_classes"], layout["batch_size"]
    if not isinstance(batch, (list, tuple)) or len(batch) != 6:
        raise UserError(f"{where}: expected upstream's list of 6 entries (coords, flip or cutout, mix index, "
                        f"lambda, box, logits), found {type(batch).__name__}")
    coords, second, perm, lam, box, logits = batch
    tensors = {"coords": coords, "flip/cutout": second, "logits": logits}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where}: {name} is {type(value).__name__}, expected a tensor")
    if tuple(logits.shape) != (batch_size, num_classes) or logits.dtype not in (torch.float16, torch.float32):
        raise UserError(f"{where}: logits are {logits.dtype} {tuple(logits.shape)}, expected fp16/fp32 "
                        f"({batch_size}, {num_classes}) like the other batches and the recipe's class count")
    if tuple(coords.shape) != (batch_size, 4) or not coords.dtype.is_floating_point:
        raise UserError(f"{where}: crop coords are {coords.dtype} {tuple(coords.shape)}, expected float ({batch_size}, 4)")
    half = logits.to(torch.float16)
    if not torch.isfinite(half).all() and torch.isfinite(logits).all():
        raise UserError(f"{where}: fp32 logits outside the fp16 range; the store keeps fp16 logits")
    record = Record(img_idx=np.zeros(batch_size, dtype=np.int32),
                    crop=pixel_boxes(coords, *layout["image_size"], where,
                                     layout.get("coords_tolerance", INTEGER_TOLERANCE)).astype(np.int32),
                    flip=np.zeros(batch_size, dtype=bool), logits=half.numpy())
    if layout["flip"] == "cutout":
        if tuple(second.shape) != (batch_size, 7):
            raise UserError(f"{where}: expected cutout records float ({batch_size}, 7) (relabel.flip=cutout), "
                            f"found {second.dtype} {tuple(second.shape)}")
        record.cutout = cutout_boxes(second, size, layout["channels"], where)
    else:
        if tuple(second.shape) != (batch_size,) or second.dtype != torch.bool:
            raise UserError(f"{where}: expected flips bool ({batch_size},) (relabel.flip=flip), found "
                            f"{second.dtype} {tuple(second.shape)}; ImageNet-21K-P labels need --set relabel.flip=cutout")
        record.flip = second.numpy().copy()
    has_mix = perm is not None
    if has_mix != (layout["mix"] == "cutmix"):
        raise UserError(f"{where}: {'has' if has_mix else 'has no'} CutMix record but the recipe says "
                        f"relabel.mix={layout['mix']}; pass --set relabel.mix={'cutmix' if has_mix else 'none'}")
    if has_mix:
        if box is None:
            raise UserError(f"{where}: a mix without a box is Mixup, which the label store does not hold")
        if not isinstance(perm, torch.Tensor) or tuple(perm.shape) != (batch_size,) or perm.dtype.is_floating_point:
            raise UserError(f"{where}: the CutMix index should be an integer tensor ({batch_size},)")
        if sorted(perm.tolist()) != list(range(batch_size)):
            raise UserError(f"{where}: the CutMix index is not a permutation of the batch")
        if not isinstance(lam, (float, int)) or isinstance(lam, bool):
            raise UserError(f"{where}: the CutMix lambda is {type(lam).__name__}, expected a float")
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise UserError(f"{where}: the CutMix box should be a list of 4 integers")
        x1, y1, x2, y2 = (_int_value(v, where) for v in box)
        if not (0 <= x1 <= x2 <= size and 0 <= y1 <= y2 <= size):
            raise UserError(f"{where}: CutMix box {[x1, y1, x2, y2]} is outside the {size}x{size} crop")
        # upstream pastes images[:, :, x1:x2, y1:y2]: its "x" indexes rows, our box is (y1, y2, x1, x2) by rows
        record.mix_perm, record.mix_lam = perm.numpy().astype(np.int32), float(lam)
        record.mix_box = np.array([x1, x2, y1, y2], dtype=np.int32)
    return record, str(logits.dtype).replace("torch.", "")


def _scan(root: Path) -> dict[int, dict[int, Path]]:
    """{epoch: {batch: file}} of an upstream soft-label directory."""
    if not root.is_dir():
        raise UserError(f"soft-label directory {root} does not exist")
    found = {}
    for entry in os.scandir(root):
        match = EPOCH_DIR.fullmatch(entry.name)
        if entry.is_dir() and match:
            files = {int(m.group(1)): Path(entry.path) / name for name in os.listdir(entry.path)
                     if (m := BATCH_FILE.fullmatch(name))}
            if files:
                found[int(match.group(1))] = files
    if not found:
        raise UserError(f"{root} holds no epoch_<e>/batch_<b>.tar files: not an upstream soft-label directory")
    return found


def _record_ids(found: dict, batches_per_epoch: int, partial: bool, where: Path) -> tuple[list[tuple[int, int]], int]:
    """(epoch, batch) pairs to import in id order, and how many partial last batches are dropped."""
    pairs, dropped = [], 0
    for epoch in sorted(found):
        for batch in sorted(found[epoch]):
            if batch < batches_per_epoch:
                pairs.append((epoch, batch))
            elif batch == batches_per_epoch and partial:
                dropped += 1
            else:
                raise UserError(f"{found[epoch][batch]}: batch {batch} is past the {batches_per_epoch} full "
                                f"batches{' and the partial one' if partial else ''} an epoch of these images has")
    ids = [e * batches_per_epoch + b for e, b in pairs]
    if ids != list(range(len(ids))):
        gap = next(i for i, g in enumerate(ids + [-1]) if g != i)
        epoch, batch = divmod(gap, batches_per_epoch)
        raise UserError(f"{where}: records are missing: epoch_{epoch}/batch_{batch}.tar "
                        "is absent but later ones exist (a label set must be whole epochs, or a prefix of them)")
    return pairs, dropped


def _orders(root: Path, num_images: int, epochs: int, seed: int):
    """(an iterator over each epoch's upstream image order, how it was obtained).

    ``sampler_indices_epoch.json``, upstream's own record, is used when present and compared with
    the regenerated order (the result goes into the store's meta); without it the order is
    regenerated epoch by epoch from the seeded RandomSampler.
    """
    info = {"source": "regenerated", "torch": torch.__version__,
            "sampler": f"torch.utils.data.RandomSampler with torch.Generator().manual_seed({seed}), one generator "
                       "across epochs, each epoch iterated to its end"}
    path = root / ORDER_JSON
    if not path.is_file():
        return upstream_orders(num_images, epochs, seed), info
    try:
        recorded = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(recorded, dict):
        raise UserError(f"{path}: expected {{epoch: [image indices]}}")
    orders, differ = [], []
    for epoch, regenerated in enumerate(upstream_orders(num_images, epochs, seed)):
        listed = recorded.pop(str(epoch), None)
        if listed is None:
            orders.append(regenerated.astype(np.int32))
            continue
        order = np.asarray(listed, dtype=np.int64)
        if order.ndim != 1 or (order.size and (order.min() < 0 or order.max() >= num_images)):
            raise UserError(f"{path}: epoch {epoch} lists indices outside [0, {num_images})")
        if not np.array_equal(order, regenerated[:len(order)]):
            differ.append(epoch)
        orders.append(order.astype(np.int32))
    info.update(source=ORDER_JSON, regenerated_differs_in_epochs=differ)
    return iter(orders), info


def _batch_shape(found: dict) -> tuple[int, int]:
    """(B, K) from the logits of the first file, which every other file must match."""
    file = found[min(found)][min(found[min(found)])]
    batch = load_plain(file, numpy_int64_globals())
    if not isinstance(batch, (list, tuple)) or len(batch) != 6 or not isinstance(batch[5], torch.Tensor) \
            or batch[5].ndim != 2:
        raise UserError(f"{file}: not upstream's batch list (6 entries ending in logits [B, K])")
    return tuple(batch[5].shape)


def distilled_with_map(workdir: WorkDir, channels: int):
    """The imported distilled set and its upstream-index -> our-index map (from manifest.json)."""
    manifest_path = workdir.distilled / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if "upstream_to_ours" not in manifest:
        raise UserError(f"{workdir.distilled} was not imported from upstream's images: run `lpld import images` "
                        "first (upstream's labels index its own image listing)")
    distilled = bank.open(workdir.distilled, channels)
    mapping = np.asarray(manifest["upstream_to_ours"], dtype=np.int64)
    if len(mapping) != len(distilled.images):
        raise UserError(f"{manifest_path} maps {len(mapping)} images but {workdir.distilled} holds {len(distilled.images)}")
    return distilled, mapping


def import_labels(path: str | Path, recipe: Recipe, workdir: WorkDir, out: str | Path | None = None,
                  ratio: float | None = None, seed: int = UPSTREAM_ORDER_SEED) -> Path:
    """An upstream soft-label directory -> our label store (full, or pruned when only a prefix of
    the E x nb records exists: upstream's "less label" runs, with ``ratio`` their --prune_ratio).

    E is ``recipe.relabel.epochs``; B and K come from the files. Partial last batches are dropped
    unread (our stores label N // B batches per epoch). fp32 logits are rounded to fp16, the
    store's type. An interrupted import continues from its last complete epoch.
    """
    started = time.perf_counter()
    root = Path(path)
    found = _scan(root)
    distilled, mapping = distilled_with_map(workdir, recipe.data.channels)
    num_images = len(distilled.images)
    batch_size, num_classes = _batch_shape(found)
    if num_classes != recipe.data.num_classes:
        raise UserError(f"{root}: logits have {num_classes} classes but the recipe has {recipe.data.num_classes}; "
                        "pick the matching --recipe or --set data.num_classes")
    if num_images < batch_size:
        raise UserError(f"{root}: batches of {batch_size} but only {num_images} distilled images")
    nb = num_images // batch_size
    pairs, dropped = _record_ids(found, nb, num_images % batch_size != 0, root)
    epochs, total = recipe.relabel.epochs, recipe.relabel.epochs * nb
    if len(pairs) > total:
        raise UserError(f"{root} holds {len(pairs)} records = more than relabel.epochs={epochs} epochs of {nb}; "
                        f"pass --set relabel.epochs={-(-len(pairs) // nb)}")
    recipe = dataclasses.replace(recipe, relabel=dataclasses.replace(recipe.relabel, batch_size=batch_size, seed=seed))
    teacher = models.read_teacher_meta(workdir.teacher)["fingerprint"] if workdir.teacher.is_file() else None
    orders, order_info = _orders(root, num_images, -(-len(pairs) // nb), seed)
    header = dict(label_header(recipe, distilled.images, distilled.fingerprint, teacher),
                  seeds={"relabel": None, "upstream_order": seed},
                  imported_from={"path": os.path.abspath(root), "order": order_info, "partial_batches_dropped": dropped,
                                 "teacher": "upstream's relabel teacher; teacher_fingerprint names this work "
                                            "directory's teacher at import time, if it had one"})
    if len(pairs) < total:
        if ratio is None:
            raise UserError(f"{root} holds {len(pairs)} of {total} records ({epochs} epochs x {nb}): an upstream 'less "
                            "label' run; pass --ratio R (its --prune_ratio), or --set relabel.epochs=E for fewer epochs")
        if kept_count(total, ratio) != len(pairs):
            raise UserError(f"--ratio {ratio} keeps {kept_count(total, ratio)} of {total} records, "
                            f"but {root} holds {len(pairs)}")
        header = pruned_header(header, ratio, "random", 0)
        out = out or pruned_path(workdir, ratio)
    out = Path(out or workdir.labels)
    with distributed.sole_writer(out):
        writer = import_writer(out, header, np.arange(len(pairs), dtype=np.int64))
        dtypes = _write_records(writer, found, pairs, orders, mapping, header)
        writer.finish()
        size = sum(f.stat().st_size for f in out.iterdir())
        kind = f"pruned at ratio {ratio:g}" if len(pairs) < total else "full"
        print(f"import labels: {len(pairs)} records ({kind}; {batch_size} images each, {num_classes} classes, logits "
              f"{'/'.join(sorted(dtypes)) or '-'} -> float16) from {root} -> {out}: {size:,d} bytes = {size / GIB:.4f} GiB; "
              f"dropped {dropped} partial last batches ({num_images % batch_size} images each); image order "
              f"{order_info['source']} in {time.perf_counter() - started:.1f} s")
        return out


def import_writer(out: Path, header: dict, ids: np.ndarray) -> LabelStoreWriter:
    """The writer of an imported store: an interrupted import resumes its complete epochs, a finished
    store is refused (a second import would not know which labels to keep)."""
    if (out / META).exists():
        raise UserError(f"{out} already holds a label store; delete it or pass --out")
    return LabelStoreWriter(out, header, ids)


def _write_records(writer: LabelStoreWriter, found: dict, pairs: list, orders, mapping: np.ndarray, header: dict) -> set:
    """Convert and write every (epoch, batch) file in id order; returns the logit dtypes seen."""
    batch_size, nb = header["batch_size"], header["batches_per_epoch"]
    layout = {key: header[key] for key in ("size", "num_classes", "batch_size", "channels", "image_size", "flip", "mix")}
    dtypes, extra = set(), numpy_int64_globals()
    order_epoch, order = -1, None
    for row, (epoch, batch) in enumerate(tqdm(pairs, unit="batch", desc="import labels")):
        while order_epoch < epoch:  # epochs come in order; each epoch's order is drawn once
            order, order_epoch = next(orders), order_epoch + 1
        if epoch in writer.complete_epochs:
            continue
        file = found[epoch][batch]
        record, dtype = convert_batch(load_plain(file, extra), str(file), layout)
        if len(order) < (batch + 1) * batch_size:
            raise UserError(f"{ORDER_JSON}: epoch {epoch} lists {len(order)} images, too few for batch {batch}")
        record.img_idx = mapping[order[batch * batch_size:(batch + 1) * batch_size]].astype(np.int32)
        writer.write(row, record)
        dtypes.add(dtype)
        if batch == nb - 1 or row == len(pairs) - 1:
            writer.flush()
            writer.mark_epoch_complete(epoch)
    return dtypes

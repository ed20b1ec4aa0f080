"""Label pruning: which records to keep (pools) and which to train on each epoch (plans), SPEC.md section 5.

The unit is one whole record (a stored batch: B logits rows and its augmentation). Pruning at
ratio r keeps floor((1 - r) * L) of the L records, a compression factor of 1 / (1 - r): 0.9,
0.95, 0.975 and 0.99 give 10x, 20x, 40x and 100x. Both are computed in exact decimal arithmetic
so that 0.9 keeps 10% and not one record less (binary 1 - 0.9 is 0.09999...).

Pools (``select_pool`` kinds):
- "random" (default, the paper): the first floor((1 - r) * L) ids. Upstream generates full epochs
  in random order and keeps that prefix; every epoch is an independent random draw, so the
  prefix is a random sample of records, and it is the only pool that lets relabel stop early
  (``lpld relabel --generate-only-kept``) instead of generating everything. "order" is the same
  pool, replayed in order by ``plan``.
- "subset": a seeded uniform random subset of all records (spread over all epochs).
- "epoch": the first floor((1 - r) * E) whole epochs (the paper's epoch-level pruning).
- "<scorer>-easy" / "<scorer>-hard": the records with the highest / lowest score in ``SCORERS``
  (the paper's Table 5a study; it found random as good or better). These need the logits, so
  they prune a full store and cannot be generated directly.

Plans are pure functions of (epoch, seed, pool): ``plan``.
"""
from __future__ import annotations

import argparse
import math
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from . import atomic, seeds
from .errors import UserError
from .codecs import LogitCodec, add_codec_arguments, codec_from_args
from .labels import LabelStore, LabelStoreWriter, storage_report
from .workdir import WorkDir

ROWS_PER_COPY = 256


def _kept_fraction(ratio: float) -> Fraction:
    if not 0 <= ratio < 1:
        raise UserError(f"prune ratio {ratio}: must be in [0, 1), e.g. 0.975 for 40x")
    return 1 - Fraction(repr(ratio))


def compression_factor(ratio: float) -> float:
    """1 / (1 - ratio): how many times fewer records are stored (0.975 -> 40.0)."""
    return float(1 / _kept_fraction(ratio))


def kept_count(total: int, ratio: float) -> int:
    """floor((1 - ratio) * total), exactly; at least one record, else UserError."""
    count = math.floor(total * _kept_fraction(ratio))
    if count < 1:
        raise UserError(f"pruning {total} records at ratio {ratio} keeps none; lower the ratio or generate more epochs")
    return count


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _per_record(store: LabelStore, score_rows: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a [rows, B, K] logits -> [rows] score in chunks (the logits can be many GiB)."""
    chunks = range(0, len(store), ROWS_PER_COPY)
    return np.concatenate([score_rows(store.logits(slice(i, i + ROWS_PER_COPY))) for i in chunks])


def confidence(store: LabelStore) -> np.ndarray:
    """Mean top-1 teacher probability over the batch."""
    return _per_record(store, lambda z: _softmax(z).max(axis=-1).mean(axis=-1))


def margin(store: LabelStore) -> np.ndarray:
    """Mean gap between the top-2 teacher probabilities."""
    def gap(z):
        top2 = np.sort(_softmax(z), axis=-1)[..., -2:]
        return (top2[..., 1] - top2[..., 0]).mean(axis=-1)
    return _per_record(store, gap)


def unmixed_area(store: LabelStore) -> np.ndarray:
    """1 - the CutMix area ratio: the fraction of each image that is its own."""
    if "mix_box" not in store.specs:
        raise UserError(f"{store.path} has no CutMix records; the unmixed-area scorer needs mix=cutmix labels")
    y1, y2, x1, x2 = np.asarray(store.array("mix_box"), dtype=np.int64).T
    return 1 - (y2 - y1) * (x2 - x1) / store.meta["size"] ** 2


# Per-record scores, higher = easier: "<name>-easy" keeps the highest, "<name>-hard" the lowest.
SCORERS: dict[str, Callable[[LabelStore], np.ndarray]] = {
    "confidence": confidence,
    "margin": margin,
    "unmixed-area": unmixed_area,
}
POOLS = ("random", "order", "subset", "epoch", *(f"{name}-{end}" for name in SCORERS for end in ("easy", "hard")))


def select_pool(ids, batches_per_epoch: int, ratio: float, kind: str = "random", seed: int = 0,
                store: LabelStore | None = None) -> np.ndarray:
    """The kept record ids (sorted int64) out of ``ids``; see the module docstring for the kinds."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    if kind in ("random", "order"):
        return ids[: kept_count(len(ids), ratio)]
    if kind == "subset":
        rng = seeds.numpy_generator(seed, len(ids))
        return np.sort(rng.choice(ids, kept_count(len(ids), ratio), replace=False))
    if kind == "epoch":
        epochs, counts = np.unique(ids // batches_per_epoch, return_counts=True)
        whole = epochs[counts == batches_per_epoch]
        kept = whole[: kept_count(len(whole), ratio)] if len(whole) else whole
        if not len(kept):
            raise UserError("epoch-level pruning needs whole stored epochs; this label set has none")
        return ids[np.isin(ids // batches_per_epoch, kept)]
    name, _, end = kind.rpartition("-")
    if name not in SCORERS or end not in ("easy", "hard"):
        raise UserError(f"unknown pool {kind!r}; choose one of: {', '.join(POOLS)}")
    if store is None:
        raise UserError(f"pool {kind!r} scores the stored logits: prune a full label store instead of generating only kept records")
    scores = SCORERS[name](store)[[store.row(g) for g in ids]]
    order = np.argsort(-scores if end == "easy" else scores, kind="stable")
    return np.sort(ids[order[: kept_count(len(ids), ratio)]])


def plan(epoch: int, seed: int, pool, batches_per_epoch: int, kind: str = "random") -> list[int]:
    """The record ids training epoch ``epoch`` replays, in order: a pure function of its arguments.

    kind "random" (and every pool but the two below; the paper's plan): batches_per_epoch ids
    drawn uniformly with replacement from the pool by a generator seeded from (seed, epoch).
    "order": consecutive pool ids, wrapping around (at ratio 0 epoch e replays stored epoch e).
    "epoch": one whole stored epoch of the pool, drawn at random.
    """
    pool = np.asarray(pool, dtype=np.int64)
    if kind == "order":
        return pool[(epoch * batches_per_epoch + np.arange(batches_per_epoch)) % len(pool)].tolist()
    rng = seeds.numpy_generator(seed, epoch)
    if kind == "epoch":
        epochs = np.unique(pool // batches_per_epoch)
        chosen = epochs[rng.integers(len(epochs))]
        return pool[pool // batches_per_epoch == chosen].tolist()
    return pool[rng.integers(0, len(pool), batches_per_epoch)].tolist()


def pruned_header(header: dict, ratio: float, kind: str, seed: int, codec: LogitCodec | None = None) -> dict:
    """The meta of a pruned store: the source's, with this pruning step appended to its history
    (and the logit codec it is re-encoded to, if any)."""
    dropped = ("format", "num_records", "arrays", *(("topk_fill",) if codec else ()))  # a new codec names its own fill
    kept = {key: value for key, value in header.items() if key not in dropped}
    recoded = codec.meta() if codec else {}
    return dict(kept, prune=[*header["prune"], {"ratio": ratio, "pool": kind, "seed": seed}], **recoded)


def pruned_path(workdir: WorkDir, ratio: float) -> Path:
    """Where a run keeps its pruned store, e.g. labels-r0.975/ next to labels/."""
    return workdir.root / f"labels-r{ratio:g}"


def prune_store(source: LabelStore, out: str | Path, ratio: float, kind: str = "random", seed: int = 0,
                codec: LogitCodec | None = None) -> Path:
    """Write a store holding only the kept records of ``source`` (so the bytes on disk shrink),
    its logits re-encoded by ``codec`` when one is given (pruning and the codecs compose)."""
    stored = LogitCodec.of(source.meta)
    if codec is not None and stored.topk and codec.fill not in ("mr", stored.fill):  # MR needs no fill
        raise UserError(f"{source.path} keeps the top {stored.topk} logits decoded as {stored.fill}: the fill of another "
                        f"decoding ({codec.fill}) needs the classes it dropped; prune the full store instead")
    if codec is not None and stored.topk and not 0 < codec.topk <= stored.topk:
        raise UserError(f"{source.path} keeps the top {stored.topk} logits of each sample; a pruned copy can keep "
                        f"at most those (--topk 1 to {stored.topk}), not {codec.topk or 'all'}")
    with atomic.sole_writer(out):  # one process prunes (lpld run: rank 0 alone): no barrier
        kept = select_pool(source.ids, source.batches_per_epoch, ratio, kind, seed, store=source)
        if codec == stored:
            codec = None
        writer = LabelStoreWriter(out, pruned_header(source.meta, ratio, kind, seed, codec), kept)
        if writer.done:
            return writer.path
        rows = np.array([source.row(g) for g in kept])
        for start in range(0, len(rows), ROWS_PER_COPY):
            chunk = rows[start : start + ROWS_PER_COPY]
            part = slice(start, start + len(chunk))
            copied = [name for name in source.specs if codec is None or name not in stored.array_names]
            for name in copied:
                writer.arrays[name][part] = source.array(name)[chunk]
            if codec is not None:
                for name, value in codec.encode(source.logits(chunk)).items():
                    writer.arrays[name][part] = value
        return writer.finish()


def _command(args: argparse.Namespace) -> None:
    source = LabelStore.open(args.source, verify_checksums=not args.no_verify)
    out = prune_store(source, args.out, args.ratio, args.pool, args.seed,
                      codec_from_args(args, LogitCodec.of(source.meta)))
    pruned = LabelStore.open(out, verify_checksums=False)
    storage = storage_report(pruned)
    print(f"prune: kept {len(pruned)} of {len(source)} records ({compression_factor(args.ratio):g}x, pool {args.pool}), "
          f"logits as {LogitCodec.of(pruned.meta).name}: {storage['logit_compression']:.4g}x fewer logit bytes "
          f"than full fp16 -> {out}")


def register(subparsers) -> None:
    parser = subparsers.add_parser("prune", help="write a smaller label store holding only the kept records")
    parser.add_argument("source", help="label store to prune (e.g. runs/fmnist/labels)")
    parser.add_argument("--ratio", type=float, required=True, help="fraction of records to drop: 0.9/0.95/0.975/0.99 = 10x/20x/40x/100x")
    parser.add_argument("--pool", default="random", choices=POOLS, help="which records to keep (default random: the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset pool")
    parser.add_argument("--out", required=True, help="directory of the pruned store")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the source arrays")
    add_codec_arguments(parser)
    parser.set_defaults(func=_command)

"""The soft-label store: one directory, one memory-mappable .npy per array (SPEC.md section 8).

Upstream writes one torch.save pickle per (epoch, batch): 23k-470k small files, loaded whole per
step, and keyed by the first image index of a batch (SPEC.md sections 4, 5 and 11.2-11.4). Here a
label set is a handful of columnar arrays whose row r holds the record with global id ids[r]
(epoch = g // nb, batch = g % nb), so reading record g is one lookup and one memmap slice per array, a pruned store
is the same format with fewer rows, and the whole set is checked against the sha256 recorded per
array in meta.json before anything trains on it.

Hashing a full-size store takes minutes (ImageNet-21K logits are ~655 GB), so it runs once: the
writer, or the first open, records in verified.json each array's sha256 next to what ``stat``
says about its file (size, mtime, ctime, inode), and an open whose files still match that stamp
skips the hashing. Rewriting, replacing or copying a file changes its stat and forces the hash
again; damage that stat cannot see (bit rot) takes ``lpld labels verify``, which ignores the stamp.

Partial batches never exist: an epoch's order holds N images but only nb = N // B batches are
labelled (the last N % B images of that order are skipped), so every record has exactly B rows
and no "g - 1" remap is needed (SPEC.md section 5).

The logits are kept by a ``LogitCodec`` (meta "topk" and "quant"): all K as fp16 by default (the
paper's), or the top k per sample, as fp16, 8-bit integer codes or fp8; ``record`` decodes them
back to dense fp16 logits from one slice per array, so every codec composes with pruning.

Loading never runs code: arrays are read with ``np.load(allow_pickle=False)`` and meta.json is
plain JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import identity
from .augment import Cutout, Record
from .atomic import write_atomically
from .errors import UserError
from .fingerprint import file_sha256

FORMAT = "lpld-labels/1"
META = "meta.json"
PROGRESS = "progress.json"
VERIFIED = "verified.json"
STAMP_FORMAT = "lpld-labels-verified/1"
GIB = 1024**3
GB = 1e9
REQUIRED_META = ("num_images", "batch_size", "num_classes", "channels", "epochs", "batches_per_epoch",
                 "num_records", "size", "flip", "mix", "arrays")
PARTIAL_BATCH_RULE = "excluded: batches_per_epoch = num_images // batch_size; the last images of each epoch order are not labelled"


QUANTS = ("fp16", "int8", "fp8")
FP8_MAX = 448.0  # largest finite float8_e4m3fn; it has no infinity, so larger values must be clamped


def index_dtype(num_classes: int) -> np.dtype:
    """The narrowest integer type that holds a class index (uint8 up to 256 classes)."""
    return np.dtype(np.uint8 if num_classes <= 256 else np.int16 if num_classes <= 2**15 else np.int32)


@dataclass(frozen=True)
class LogitCodec:
    """How a store keeps its logits: all K or the top k per sample, as fp16, int8 or fp8 values.

    - fp16: the teacher's logits rounded to fp16 (the paper's storage).
    - int8: 8-bit codes with a per-sample fp16 scale and offset (affine over the sample's kept
      values), 1 byte per value plus 4 per sample.
    - fp8: float8 e4m3 of the logits minus their sample maximum, 1 byte per value. Softmax does
      not change under a per-sample shift, and after it the top classes sit near 0, where e4m3 is
      finest; so the decoded logits equal the stored ones only up to that shift.
    Top-k stores the k largest values and their class indices; decoding puts -inf elsewhere, so
    softmax gives the top-k distribution renormalized. Every codec decodes one record from one
    slice per array, and ``encode`` serves relabel (one record) and prune (many) alike.
    """

    topk: int = 0
    quant: str = "fp16"

    @classmethod
    def of(cls, meta: dict) -> "LogitCodec":
        return cls(meta.get("topk", 0), meta.get("quant", "fp16"))

    @classmethod
    def parse(cls, name: str) -> "LogitCodec":
        """The inverse of ``name``: "fp8" or "top2-fp8" (ValueError for anything else)."""
        top, _, quant = name.rpartition("-")
        if quant not in QUANTS or (top and not (top.startswith("top") and top[3:].isdigit() and int(top[3:]) > 0)):
            raise ValueError(f"not a logit codec: {name!r}")
        return cls(int(top[3:]) if top else 0, quant)

    def check(self, num_classes: int) -> "LogitCodec":
        if self.quant not in QUANTS:
            raise UserError(f"logit quantization {self.quant!r}: choose one of {', '.join(QUANTS)}")
        if not 0 <= self.topk <= num_classes:
            raise UserError(f"--topk {self.topk}: must be between 0 (full logits) and the class count {num_classes}")
        return self

    @property
    def name(self) -> str:
        return f"top{self.topk}-{self.quant}" if self.topk else self.quant

    @property
    def array_names(self) -> tuple[str, ...]:
        return tuple(self.specs(0, 0, 0))

    def specs(self, rows: int, batch: int, num_classes: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        width = self.topk or num_classes
        values = np.dtype(np.float16 if self.quant == "fp16" else np.uint8)
        specs = {"topk_values" if self.topk else "logits": ((rows, batch, width), values)}
        if self.topk:
            specs["topk_indices"] = ((rows, batch, self.topk), index_dtype(num_classes))
        if self.quant == "int8":
            specs["logit_scale"] = ((rows, batch), np.dtype(np.float16))
            specs["logit_offset"] = ((rows, batch), np.dtype(np.float16))
        return specs

    def encode(self, logits) -> dict[str, np.ndarray]:
        """Arrays (as ``specs`` names them) holding logits [..., K] in this codec."""
        z = torch.as_tensor(np.asarray(logits)).float()
        arrays = {}
        if self.topk:
            top = z.topk(self.topk, dim=-1)
            z, arrays["topk_indices"] = top.values, top.indices.numpy()
        name = "topk_values" if self.topk else "logits"
        if self.quant == "fp16":
            arrays[name] = z.to(torch.float16).numpy()
        elif self.quant == "fp8":
            shifted = (z - z.amax(dim=-1, keepdim=True)).clamp(min=-FP8_MAX)
            arrays[name] = shifted.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        else:
            low, high = z.amin(dim=-1), z.amax(dim=-1)
            offset = low.to(torch.float16)
            scale = ((high - low) / 255).clamp(min=torch.finfo(torch.float16).tiny).to(torch.float16)
            codes = ((z - offset.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 255)
            arrays.update({name: codes.to(torch.uint8).numpy(), "logit_scale": scale.numpy(), "logit_offset": offset.numpy()})
        return arrays

    def decode(self, arrays: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
        """Dense fp16 logits [..., K] from this codec's arrays (-inf outside the top k)."""
        values = np.asarray(arrays["topk_values" if self.topk else "logits"])
        if self.quant == "fp8":
            values = torch.tensor(values).view(torch.float8_e4m3fn).to(torch.float16).numpy()  # a copy: memmaps are read-only
        elif self.quant == "int8":
            scale = np.asarray(arrays["logit_scale"], dtype=np.float32)[..., None]
            offset = np.asarray(arrays["logit_offset"], dtype=np.float32)[..., None]
            values = (values * scale + offset).astype(np.float16)
        if not self.topk:
            return values
        dense = np.full((*values.shape[:-1], num_classes), -np.inf, dtype=np.float16)
        np.put_along_axis(dense, np.asarray(arrays["topk_indices"]).astype(np.int64), values, axis=-1)
        return dense


def add_codec_arguments(parser: argparse.ArgumentParser) -> None:
    """--topk and --quant, shared by the commands that write a store (relabel, prune)."""
    parser.add_argument("--topk", type=int, default=None,
                        help="keep only the k largest logits per sample (0 = all K; relabel's default 0, as the paper; "
                             "prune's default: the source's)")
    parser.add_argument("--quant", choices=QUANTS, default=None,
                        help="logit values as fp16 (relabel's default, the paper's), int8 (per-sample scale and offset) "
                             "or fp8 (e4m3); prune's default: the source's")


def codec_from_args(args: argparse.Namespace, base: LogitCodec = LogitCodec()) -> LogitCodec:
    """``base`` with the fields given on the command line replaced."""
    return LogitCodec(base.topk if args.topk is None else args.topk, args.quant or base.quant)


def array_specs(meta: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array a store with this meta holds (the optional ones by recipe)."""
    rows, batch, classes = meta["num_records"], meta["batch_size"], meta["num_classes"]
    specs = {
        "ids": ((rows,), np.dtype(np.int64)),
        "img_idx": ((rows, batch), np.dtype(np.int32)),
        "crop": ((rows, batch, 4), np.dtype(np.int32)),
        "flip": ((rows, batch), np.dtype(np.bool_)),
        **LogitCodec.of(meta).specs(rows, batch, classes),
    }
    declared = meta.get("arrays", {}).get("topk_indices", {}).get("dtype")
    if "topk_indices" in specs and declared is not None and np.dtype(declared) == np.int16 and classes <= 2**15:
        specs["topk_indices"] = (specs["topk_indices"][0], np.dtype(np.int16))  # top-k stores of lpld 0.1
    if meta["flip"] == "cutout":
        specs["cutout_box"] = ((rows, batch, 4), np.dtype(np.int32))
        specs["cutout_fill"] = ((rows, batch, meta["channels"]), np.dtype(np.uint8))
    if meta["mix"] == "cutmix":
        specs["mix_perm"] = ((rows, batch), np.dtype(np.int32))
        specs["mix_lam"] = ((rows,), np.dtype(np.float64))
        specs["mix_box"] = ((rows, 4), np.dtype(np.int32))
    return specs


def _write_json(path: Path, value: dict) -> None:
    write_atomically(path, lambda partial: partial.write_text(json.dumps(value, indent=1, sort_keys=True)))


def _file_state(file: Path) -> dict:
    """What stat says about a file: any rewrite, replacement or copy (even one keeping the mtime)
    changes one of these, so a stamp that still matches them vouches for the bytes it hashed."""
    stat = file.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def _hash_arrays(path: Path, names: list[str]) -> dict[str, tuple[str, float]]:
    """sha256 and hashing seconds of each array file, one thread per file (up to the cores): one
    file hashes at ~1-2 GB/s on one core, and hashlib releases the GIL, so threads overlap."""
    def timed(name: str) -> tuple[str, float]:
        start = time.perf_counter()
        return file_sha256(path / f"{name}.npy"), time.perf_counter() - start

    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(names), os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(timed, names)))


def _write_stamp(path: Path, arrays: dict[str, dict]) -> None:
    """Record that the arrays with these file states hash to these sha256s (meta.json's state too).

    A store that cannot be written to (read-only copy) still opens; it is hashed on every open."""
    stamp = {"format": STAMP_FORMAT, META: _file_state(path / META), "arrays": arrays}
    try:
        _write_json(path / VERIFIED, stamp)
    except OSError as error:
        warnings.warn(f"{path}: cannot write {VERIFIED} ({error}); every open hashes the arrays again "
                      "(make the directory writable once and run `lpld labels verify` on it)", stacklevel=2)


def _read_stamp(path: Path) -> dict:
    """The stamp's entry per array, or {} when absent, unreadable, or made for another meta.json."""
    try:
        stamp = json.loads((path / VERIFIED).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT or stamp.get(META) != _file_state(path / META):
        return {}
    return stamp.get("arrays", {}) if isinstance(stamp.get("arrays"), dict) else {}


def _put(arrays: dict, codec: LogitCodec, row: int, record: Record) -> None:
    arrays["img_idx"][row] = record.img_idx
    arrays["crop"][row] = record.crop
    arrays["flip"][row] = record.flip
    for name, value in codec.encode(record.logits).items():
        arrays[name][row] = value
    if "cutout_box" in arrays:
        arrays["cutout_box"][row] = record.cutout.box
        arrays["cutout_fill"][row] = record.cutout.fill
    if "mix_perm" in arrays:
        arrays["mix_perm"][row] = record.mix_perm
        arrays["mix_lam"][row] = record.mix_lam
        arrays["mix_box"][row] = record.mix_box


class LabelStoreWriter:
    """Preallocated memmaps filled row by row, resumable from the last complete epoch.

    ``header`` is the store's meta without ``num_records`` and ``arrays`` (sizes, recipe,
    seeds, fingerprints). The first writer creates every array at full size; a later writer
    with the same header and ids (a resumed run, or another torchrun rank after a barrier)
    reopens them, so ranks can fill disjoint rows of one store. progress.json lists the epochs
    whose rows are all on disk; ``finish`` checksums the arrays, writes meta.json and stamps the
    store as verified (its hashes were just computed, so the first open does not hash again).
    """

    def __init__(self, path: str | Path, header: dict, ids: np.ndarray):
        self.path = Path(path)
        self.ids = np.asarray(ids, dtype=np.int64)
        self.header = dict(header, format=FORMAT, num_records=int(len(self.ids)))
        self.specs = array_specs(self.header)
        self.codec = LogitCodec.of(self.header).check(self.header["num_classes"])
        self.done = False
        progress = self.path / PROGRESS
        if (self.path / META).exists():
            self._check_same(json.loads((self.path / META).read_text()))
            self.done, self.complete_epochs = True, set(range(self.header["epochs"]))
            return
        if progress.exists():
            state = json.loads(progress.read_text())
            self._check_same(state["header"])
            self.complete_epochs = set(state["complete_epochs"])
            self.arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r+", allow_pickle=False) for name in self.specs}
            return
        if self.path.exists() and any(self.path.iterdir()):
            raise UserError(f"{self.path} exists and is not a label store in progress; choose another --out or delete it")
        self.path.mkdir(parents=True, exist_ok=True)
        self.arrays = {
            name: np.lib.format.open_memmap(self.path / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            for name, (shape, dtype) in self.specs.items()
        }
        self.arrays["ids"][:] = self.ids
        self.complete_epochs = set()
        self._save_progress()

    def _check_same(self, other: dict) -> None:
        identity.check(other, identity.of(**self.header), self.path, "delete it or choose another output directory")
        if not np.array_equal(np.load(self.path / "ids.npy", allow_pickle=False), self.ids):
            raise UserError(f"{self.path} holds other record ids; delete it or choose another output directory")

    def _save_progress(self) -> None:
        _write_json(self.path / PROGRESS, {"header": self.header, "complete_epochs": sorted(self.complete_epochs)})

    def rows_of_epoch(self, epoch: int) -> np.ndarray:
        nb = self.header["batches_per_epoch"]
        return np.flatnonzero((self.ids >= epoch * nb) & (self.ids < (epoch + 1) * nb))

    def write(self, row: int, record: Record) -> None:
        _put(self.arrays, self.codec, row, record)

    def flush(self) -> None:
        for array in self.arrays.values():
            array.flush()

    def mark_epoch_complete(self, epoch: int) -> None:
        """Record that every row of ``epoch`` is on disk (call after ``flush`` on all ranks)."""
        self.complete_epochs.add(epoch)
        self._save_progress()

    def finish(self) -> Path:
        """Checksum every array, write meta.json and the verified stamp: from now on the store opens."""
        if self.done:
            return self.path
        self.flush()
        self.arrays = {}
        states = {name: _file_state(self.path / f"{name}.npy") for name in self.specs}  # before hashing: a later write shows
        digests = {name: digest for name, (digest, _) in _hash_arrays(self.path, list(self.specs)).items()}
        arrays = {name: {"shape": list(shape), "dtype": dtype.str, "sha256": digests[name]}
                  for name, (shape, dtype) in self.specs.items()}
        _write_json(self.path / META, dict(self.header, arrays=arrays))
        _write_stamp(self.path, {name: dict(states[name], sha256=digests[name]) for name in self.specs})
        (self.path / PROGRESS).unlink()
        self.done = True
        return self.path


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(handle)
        if fortran:
            raise ValueError("Fortran order")
        return tuple(shape), dtype, handle.tell()


class LabelStore:
    """A finished label store, verified at open and read record by record through memmaps.

    The memmaps are opened lazily in each process (``__getstate__`` drops them), so a
    DataLoader worker that receives the store by pickling maps the files itself. ``hashed`` holds
    the seconds spent hashing each array at open (empty when the stamp vouched for all of them).
    """

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self.specs = array_specs(meta)
        self._arrays: dict[str, np.ndarray] = {}
        self.hashed: dict[str, float] = {}
        self.ids = np.load(path / "ids.npy", allow_pickle=False)
        total = meta["epochs"] * meta["batches_per_epoch"]
        self._row_of = np.full(total, -1, dtype=np.int64)
        self._row_of[self.ids] = np.arange(len(self.ids))

    @classmethod
    def open(cls, path: str | Path, expect_images: int | None = None, expect_classes: int | None = None,
             verify_checksums: bool = True, trust_stamp: bool = True) -> "LabelStore":
        """Open and verify a store; refuse (UserError) anything incomplete, corrupt or mismatched.

        Sizes, shapes and dtypes are always checked against meta.json. Unless ``verify_checksums``
        is False, so is the sha256 of every array that verified.json does not vouch for (all of
        them when ``trust_stamp`` is False), and the stamp is renewed: the first open of a copied
        store hashes it (~1-2 GB/s per array, in parallel), later opens cost a few ``stat`` calls.

        Under torchrun the stages verify on rank 0 only, and the other ranks wait for it in
        ``distributed.barrier``: a store poll, not a collective, so a first hash that takes
        minutes never runs out a collective's (NCCL watchdog's) timeout, and a corrupt store
        stops every rank with rank 0's message (``cli.main`` publishes it).
        """
        path = Path(path)
        if not (path / META).is_file():
            if (path / PROGRESS).is_file():
                raise UserError(f"{path}: label generation did not finish; rerun `lpld relabel` to resume it")
            raise UserError(f"{path}: no label store here (meta.json missing); run `lpld relabel` first")
        try:
            meta = json.loads((path / META).read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{path / META} is not valid JSON ({error}); regenerate the store") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"{path}: not a {FORMAT} meta.json; regenerate the store")
        missing = [key for key in REQUIRED_META if key not in meta]
        if missing:
            raise UserError(f"{path / META} lacks {', '.join(missing)}; the meta is corrupt, regenerate the store")
        for expected, key, what in ((expect_images, "num_images", "images"), (expect_classes, "num_classes", "classes")):
            if expected is not None and meta[key] != expected:
                raise UserError(f"{path}: labels were made for {meta[key]} {what}, but {expected} are given; "
                                "use the label store made from these distilled images and this teacher")
        if meta["batches_per_epoch"] != meta["num_images"] // meta["batch_size"]:
            raise UserError(f"{path}: batches_per_epoch does not equal num_images // batch_size; the meta is corrupt")
        specs = array_specs(meta)
        if set(meta.get("arrays", {})) != set(specs):
            raise UserError(f"{path}: meta lists arrays {sorted(meta.get('arrays', {}))}, expected {sorted(specs)}")
        for name, (shape, dtype) in specs.items():
            cls._verify_array(path, name, shape, dtype, meta["arrays"][name])
        hashed = cls._verify_checksums(path, meta, trust_stamp) if verify_checksums else {}
        store = cls(path, meta)
        store.hashed = hashed
        store._verify_contents()
        return store

    @staticmethod
    def _verify_checksums(path: Path, meta: dict, trust_stamp: bool) -> dict[str, float]:
        """Hash the arrays the stamp does not vouch for, compare with meta.json, renew the stamp;
        return the seconds spent per array hashed."""
        declared = {name: entry["sha256"] for name, entry in meta["arrays"].items()}
        states = {name: _file_state(path / f"{name}.npy") for name in declared}  # before hashing: a later write shows
        stamped = _read_stamp(path) if trust_stamp else {}
        vouched = {name: dict(states[name], sha256=declared[name]) for name in declared}
        stale = [name for name in declared if stamped.get(name) != vouched[name]]
        hashed = _hash_arrays(path, stale)
        for name, (digest, _) in hashed.items():
            if digest != declared[name]:
                raise UserError(f"{path / f'{name}.npy'}: sha256 differs from meta.json (corrupted or modified); "
                                "re-copy or regenerate the store")
        if stale:
            _write_stamp(path, vouched)
        return {name: seconds for name, (_, seconds) in hashed.items()}

    @staticmethod
    def _verify_array(path: Path, name: str, shape, dtype, declared: dict) -> None:
        file = path / f"{name}.npy"
        if not file.is_file():
            raise UserError(f"{path}: array file {file.name} is missing; regenerate or re-copy the store")
        if not isinstance(declared, dict) or not {"shape", "dtype", "sha256"} <= declared.keys():
            raise UserError(f"{path}: meta.json lacks the shape, dtype or sha256 of {name}; the meta is corrupt")
        if tuple(declared["shape"]) != shape or np.dtype(declared["dtype"]) != dtype:
            raise UserError(f"{path}: meta declares {name} as {declared['dtype']} {declared['shape']}, "
                            f"expected {dtype.str} {list(shape)}; the meta is corrupt")
        try:
            file_shape, file_dtype, offset = _read_npy_header(file)
        except ValueError as error:
            raise UserError(f"{file}: not a plain .npy array ({error}); regenerate the store") from None
        if file_shape != shape or file_dtype != dtype:
            raise UserError(f"{file}: holds {file_dtype.str} {list(file_shape)}, meta says {dtype.str} {list(shape)}")
        size = offset + int(np.prod(shape)) * dtype.itemsize
        if file.stat().st_size != size:
            raise UserError(f"{file}: {file.stat().st_size} bytes, expected {size} (truncated or padded); re-copy the store")

    def _verify_contents(self) -> None:
        """Ids and image indices in range, so a bad store fails here and not mid-training."""
        total = len(self._row_of)
        if len(self.ids) and (np.any(np.diff(self.ids) <= 0) or self.ids[0] < 0 or self.ids[-1] >= total):
            raise UserError(f"{self.path}: record ids are not increasing within [0, {total}); the store is corrupt")
        img_idx = self.array("img_idx")
        if img_idx.size and (img_idx.min() < 0 or img_idx.max() >= self.meta["num_images"]):
            raise UserError(f"{self.path}: image indices outside [0, {self.meta['num_images']}); the store is corrupt")

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _arrays={})

    def array(self, name: str) -> np.ndarray:
        """The read-only memmap of one array, opened on first use in this process."""
        if name not in self._arrays:
            self._arrays[name] = np.load(self.path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        return self._arrays[name]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def batches_per_epoch(self) -> int:
        return self.meta["batches_per_epoch"]

    @property
    def fingerprint(self) -> str:
        """The checksums of all arrays, hashed: names this exact label set."""
        return file_sha256(self.path / META)

    def row(self, g: int) -> int:
        row = int(self._row_of[g]) if 0 <= g < len(self._row_of) else -1
        if row < 0:
            raise KeyError(f"record {g} is not in the label store {self.path}")
        return row

    def logits(self, rows: slice | np.ndarray) -> np.ndarray:
        """Dense fp16 logits [rows, B, K] of some rows (a slice or an index array), whatever the codec."""
        codec = LogitCodec.of(self.meta)
        arrays = {name: self.array(name)[rows] for name in codec.array_names}
        return np.array(codec.decode(arrays, self.meta["num_classes"]))

    def record(self, g: int) -> Record:
        """Record with global id ``g`` (O(1): one lookup, then one slice per array)."""
        r = self.row(g)
        arrays = {name: self.array(name) for name in self.specs}
        record = Record(img_idx=np.array(arrays["img_idx"][r]), crop=np.array(arrays["crop"][r]),
                        flip=np.array(arrays["flip"][r]), logits=self.logits(slice(r, r + 1))[0])
        if "cutout_box" in arrays:
            record.cutout = Cutout(box=np.array(arrays["cutout_box"][r]), fill=np.array(arrays["cutout_fill"][r]))
        if "mix_perm" in arrays:
            record.mix_perm = np.array(arrays["mix_perm"][r])
            record.mix_lam = float(arrays["mix_lam"][r])
            record.mix_box = np.array(arrays["mix_box"][r])
        return record


def storage_report(store: LabelStore) -> dict:
    """Bytes on disk next to what the full label set would cost (SPEC.md section 10.11)."""
    files = {name: (store.path / f"{name}.npy").stat().st_size for name in store.specs}
    data = {name: int(np.prod(shape)) * dtype.itemsize for name, (shape, dtype) in store.specs.items()}
    meta = store.meta
    full_records = meta["epochs"] * meta["batches_per_epoch"]
    per_record = sum(data.values()) / max(len(store), 1)
    logit_bytes = sum(data[name] for name in LogitCodec.of(meta).array_names)
    full_logit_bytes = full_records * meta["batch_size"] * meta["num_classes"] * 2  # every record, fp16, all K
    return {
        "records": len(store),
        "full_records": full_records,
        "compression_factor": full_records / max(len(store), 1),
        "bytes_on_disk": sum(files.values()) + (store.path / META).stat().st_size,
        "bytes_per_array": files,
        "full_bytes": int(per_record * full_records),
        "paper_logit_bytes": meta["epochs"] * meta["num_images"] * meta["num_classes"] * 2,
        "logit_bytes": logit_bytes,
        "logit_compression": full_logit_bytes / max(logit_bytes, 1),
    }


def _info(args: argparse.Namespace) -> None:
    store = LabelStore.open(args.path, verify_checksums=not args.no_verify)
    report = storage_report(store)
    meta = store.meta
    print(f"{store.path}: {report['records']} of {report['full_records']} records "
          f"({meta['epochs']} epochs x {meta['batches_per_epoch']} batches of {meta['batch_size']} images, "
          f"{meta['num_classes']} classes, logits as {LogitCodec.of(meta).name})")
    for name, size in report["bytes_per_array"].items():
        print(f"  {name:12s} {size:>16,d} bytes")
    print(f"  on disk      {report['bytes_on_disk']:>16,d} bytes = {report['bytes_on_disk'] / GIB:.4g} GiB")
    print(f"  full labels  {report['full_bytes']:>16,d} bytes = {report['full_bytes'] / GIB:.4g} GiB "
          f"(logits alone E*N*K*2 = {report['paper_logit_bytes'] / GIB:.4g} GiB)")
    print(f"  compression  {report['compression_factor']:.2f}x in records, "
          f"{report['logit_compression']:.2f}x in logit bytes against full fp16 logits")


def _verify(args: argparse.Namespace) -> None:
    """Hash every array whatever verified.json says (it cannot see damage that keeps a file's stat),
    then renew the stamp; prints the throughput per array and in all."""
    start = time.perf_counter()
    store = LabelStore.open(args.path, trust_stamp=False)
    seconds = time.perf_counter() - start
    total = 0
    for name, hashing in store.hashed.items():
        size = (store.path / f"{name}.npy").stat().st_size
        total += size
        print(f"  {name:12s} {size:>16,d} bytes in {hashing:8.3f} s = {size / GB / max(hashing, 1e-9):6.2f} GB/s")
    print(f"{store.path}: all {len(store.hashed)} arrays match meta.json's sha256: {total / GB:.3f} GB "
          f"in {seconds:.2f} s = {total / GB / max(seconds, 1e-9):.2f} GB/s")


def register(subparsers) -> None:
    parser = subparsers.add_parser("labels", help="inspect a label store")
    actions = parser.add_subparsers(dest="action", required=True)
    info = actions.add_parser("info", help="sizes on disk (bytes, GiB) against full labels, and the compression factor")
    info.add_argument("path", help="label store directory")
    info.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every array (sizes are still checked)")
    info.set_defaults(func=_info)
    verify = actions.add_parser("verify", help=f"hash every array against meta.json even if {VERIFIED} vouches for it, "
                                               "print GB/s, renew the stamp")
    verify.add_argument("path", help="label store directory")
    verify.set_defaults(func=_verify)

"""The soft-label store: one directory, one memory-mappable .npy per array (SPEC.md section 8).

Upstream writes one torch.save pickle per (epoch, batch): 23k-470k small files, loaded whole per
step, and keyed by the first image index of a batch (SPEC.md sections 4, 5 and 11.2-11.4). Here a
label set is a handful of columnar arrays whose row r holds the record with global id ids[r]
(epoch = g // nb, batch = g % nb), so reading record g is one lookup and one memmap slice per array, a pruned store
is the same format with fewer rows, and the whole set is checked against the sha256 recorded per
array in meta.json before anything trains on it.

Hashing a full-size store takes minutes (ImageNet-21K logits are ~655 GB), so it runs once and is
then vouched for by a stamp of the files' stat (``stamp.py``); ``lpld labels verify`` hashes anyway.

Partial batches never exist: an epoch's order holds N images but only nb = N // B batches are
labelled (the last N % B images of that order are skipped), so every record has exactly B rows
and no "g - 1" remap is needed (SPEC.md section 5).

The logits are kept by a ``LogitCodec`` (``codecs.py``; meta "topk" and "quant"): all K as fp16 by
default (the paper's), or the top k per sample, as fp16, 8-bit integer codes or fp8; ``record``
decodes them back to dense fp16 logits from one slice per array, so every codec composes with pruning.

Loading never runs code: arrays are read with ``np.load(allow_pickle=False)`` and meta.json is
plain JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from . import identity
from .atomic import write_json
from .augment import Cutout, Record
from .codecs import LogitCodec
from .errors import UserError
from .fingerprint import file_sha256
from .stamp import VERIFIED, file_state, hash_arrays, stamped_hashes, write_stamp

FORMAT = "lpld-labels/1"
META = "meta.json"
PROGRESS = "progress.json"
GIB = 1024**3
GB = 1e9
REQUIRED_META = ("num_images", "batch_size", "num_classes", "channels", "epochs", "batches_per_epoch",
                 "num_records", "size", "flip", "mix", "arrays")
PARTIAL_BATCH_RULE = "excluded: batches_per_epoch = num_images // batch_size; the last images of each epoch order are not labelled"


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
        write_json(self.path / PROGRESS, {"header": self.header, "complete_epochs": sorted(self.complete_epochs)})

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
        states = {name: file_state(self.path / f"{name}.npy") for name in self.specs}  # before hashing: a later write shows
        digests = {name: digest for name, (digest, _) in hash_arrays(self.path, list(self.specs)).items()}
        arrays = {name: {"shape": list(shape), "dtype": dtype.str, "sha256": digests[name]}
                  for name, (shape, dtype) in self.specs.items()}
        write_json(self.path / META, dict(self.header, arrays=arrays))
        write_stamp(self.path, self.path / META, {name: dict(states[name], sha256=digests[name]) for name in self.specs})
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
        hashed = stamped_hashes(path, path / META, meta, trust_stamp) if verify_checksums else {}
        store = cls(path, meta)
        store.hashed = hashed
        store._verify_contents()
        return store

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

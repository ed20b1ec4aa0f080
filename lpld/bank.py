"""The image bank: a distilled ImageFolder decoded once into one read-only, memory-mapped uint8 array.

At ImageNet scale (IN-1K IPC 200, IN-21K IPC 20: about 30 GB of pixels) decoding the folder at the
start of every stage on every rank, and holding the pixels several times per rank, costs minutes
and more memory than a host has. The bank is decoded once, in a thread pool (torchvision's
decoders release the GIL), into ``bank.npy`` beside the images, with its index in ``bank.json``.
Stages open it with ``np.load(mmap_mode="r")``: the ranks of a host share one copy through the
page cache, and nothing else holds the pixels.

Layout [N, H, W, C]: DALI's external source takes HWC samples, so its batch is one gather of
rows; the torch replay (``augment.replay``) takes [N, C, H, W], a permuted view of the same
memory from which ``index_select`` gathers just the batch (contiguous, so the replayed pixels are
the same). CHW storage would make the DALI loader transpose what HWC gives it as it is.

The index holds the files (relative to the folder: sorted class folders, then sorted files, so
index i is ``img_idx`` i of the label stores), their labels, the class names, the decode
(channels) and two identities: ``fingerprint``, a sha256 over each file's name, size and the
sha256 of its bytes (streamed, never decoded), which label stores record as
``dataset_fingerprint``; and ``signature``, a hash of each file's name, size and ctime_ns (which
every write moves, and no tool sets back). Opening compares the signature (one stat per file);
only when it differs are the files hashed again, and if their bytes changed the bank is rebuilt,
so stale pixels are never used.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.io import read_file
from tqdm import tqdm

from . import distributed
from .atomic import exclusive, write_atomically
from .data import DistilledImages, decode_file, distilled_listing
from .errors import UserError
from .fingerprint import file_sha256
from .recipes import add_recipe_arguments, recipe_from_args

BANK = "bank.npy"
INDEX = "bank.json"
LOCK = "bank.lock"
FORMAT = "lpld-bank/1"
CHUNK = 64  # images per decoding task: an even spread over the threads and a live progress bar


@dataclass(frozen=True)
class Listing:
    """What a distilled folder holds now, without decoding it."""

    classes: list[str]
    files: list[str]  # relative to the folder, in index order
    labels: list[int]
    sizes: list[int]
    signature: str  # hash of names, sizes and change times: the cheap staleness check


def list_folder(folder: Path) -> Listing:
    listing = distilled_listing(folder)
    files, labels, sizes, stamps = [], [], [], hashlib.sha256()
    for label, (name, found) in enumerate(listing.items()):
        for file in found:
            files.append(f"{name}/{file.name}")
            labels.append(label)
            sizes.append(file.size)
            stamps.update(f"{name}/{file.name}|{file.size}|{file.ctime_ns}\n".encode())
    return Listing(list(listing), files, labels, sizes, stamps.hexdigest()[:16])


def fingerprint(listing: Listing, digests: list[str]) -> str:
    """sha256 over (name, size, sha256 of the bytes) of every file: the identity of the images."""
    digest = hashlib.sha256()
    for name, size, file_digest in zip(listing.files, listing.sizes, digests, strict=True):
        digest.update(f"{name}|{size}|{file_digest}\n".encode())
    return digest.hexdigest()[:16]


def _workers(workers: int | None) -> int:
    return workers or len(os.sched_getaffinity(0))


@contextlib.contextmanager
def _exclusive(folder: Path):
    """One process at a time checks, builds or updates a folder's bank (``flock``: e.g. two students
    trained at once from one work directory); the others wait, then find it current."""
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist: run `lpld recover` first, or check the path")
    try:
        (folder / LOCK).touch()
    except OSError as error:
        raise _unwritable(folder, error) from None
    with exclusive(folder / LOCK):
        yield


def _unwritable(folder: Path, error: OSError) -> UserError:
    return UserError(f"cannot write the image bank into {folder} ({error}); make the folder writable, "
                     "or copy it somewhere writable and use that copy")


def build(folder: str | Path, channels: int, workers: int | None = None, show_progress: bool = True) -> dict:
    """Decode every image of the ImageFolder ``folder`` (same-size images, ours or another project's)
    into ``folder/bank.npy`` and write its index ``folder/bank.json``; returns the index.

    Each file is read once, hashed and decoded from the same bytes, ``workers`` threads at a time,
    into a preallocated memory map written under a partial name and renamed when complete.
    """
    folder = Path(folder)
    with _exclusive(folder):
        return _build(folder, channels, workers, show_progress)


def _build(folder: Path, channels: int, workers: int | None, show_progress: bool) -> dict:
    started = time.perf_counter()
    listing = list_folder(folder)
    count, workers = len(listing.files), _workers(workers)
    first = decode_file(str(folder / listing.files[0]), channels)
    shape = (count, first.shape[1], first.shape[2], first.shape[0])
    digests: list[str] = [""] * count

    def fill(partial: Path) -> None:
        pixels = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)

        def decode_chunk(start: int) -> int:
            stop = min(start + CHUNK, count)
            for i in range(start, stop):
                path = str(folder / listing.files[i])
                encoded = read_file(path)
                digests[i] = hashlib.sha256(encoded.numpy()).hexdigest()
                image = decode_file(path, channels, encoded)
                if image.shape != first.shape:
                    raise UserError(f"distilled images in {folder} differ in size ({tuple(first.shape)} for "
                                    f"{listing.files[0]}, {tuple(image.shape)} for {listing.files[i]}); "
                                    "all must share one size")
                pixels[i] = image.permute(1, 2, 0).numpy()
            return stop - start

        try:
            with ThreadPoolExecutor(workers) as pool, tqdm(total=count, unit="img", desc="bank",
                                                           disable=not show_progress) as bar:
                for done in pool.map(decode_chunk, range(0, count, CHUNK)):  # an error cancels the chunks not started
                    bar.update(done)
            pixels.flush()
        except BaseException:  # a bad image or an interrupt: leave no array-sized partial file behind
            partial.unlink(missing_ok=True)
            raise

    index_path = folder / INDEX
    try:
        index_path.unlink(missing_ok=True)  # from here until the new index exists, the bank reads as missing
        write_atomically(folder / BANK, fill)
    except OSError as error:
        raise _unwritable(folder, error) from None
    index = {"format": FORMAT, "layout": "NHWC", "shape": list(shape), "channels": channels,
             "classes": listing.classes, "files": listing.files, "labels": listing.labels,
             "fingerprint": fingerprint(listing, digests), "signature": listing.signature}
    _write_index(folder, index)
    if show_progress:
        print(f"bank: {count} images of {shape[1]}x{shape[2]}x{shape[3]} decoded with {workers} threads in "
              f"{time.perf_counter() - started:.1f} s -> {folder / BANK} ({np.prod(shape):,d} bytes); "
              f"fingerprint {index['fingerprint']}")
    return index


def _write_index(folder: Path, index: dict) -> None:
    write_atomically(folder / INDEX, lambda partial: partial.write_text(json.dumps(index)))


def _read_index(folder: Path, channels: int) -> tuple[dict | None, str | None]:
    """(index, None) when the bank files are whole and hold ``channels``-channel images, else (None, why not)."""
    try:
        index = json.loads((folder / INDEX).read_text())
        shape = np.load(folder / BANK, mmap_mode="r").shape
    except FileNotFoundError:
        return None, f"{folder} has no image bank yet"
    except (OSError, ValueError) as error:  # a damaged index (JSONDecodeError) or array header
        return None, f"the image bank of {folder} is unreadable ({error})"
    if index.get("format") != FORMAT or list(shape) != index.get("shape"):
        return None, f"the image bank of {folder} is of another format or incomplete"
    if index["channels"] != channels:
        return None, f"the image bank of {folder} holds {index['channels']}-channel images, {channels} are needed"
    return index, None


def _current_index(folder: Path, channels: int, workers: int | None) -> tuple[dict | None, str | None]:
    """(index, None) when the bank holds the folder's current files decoded to ``channels``, else
    (None, why not). Files whose times changed but whose bytes did not (a copy, a touch) keep the
    bank, and their new signature is stored so that the next check is cheap again."""
    index, stale = _read_index(folder, channels)
    if stale is not None:
        return None, stale
    listing = list_folder(folder)
    if listing.signature == index["signature"]:
        return index, None
    if listing.files != index["files"]:
        return None, f"image files in {folder} were added, removed or renamed since its bank was built"
    with ThreadPoolExecutor(_workers(workers)) as pool:
        digests = list(pool.map(file_sha256, (folder / name for name in listing.files)))
    if fingerprint(listing, digests) != index["fingerprint"]:
        return None, f"image files in {folder} changed since its bank was built"
    index["signature"] = listing.signature
    _write_index(folder, index)
    return index, None


def refresh(folder: str | Path, channels: int, workers: int | None = None,
            show_progress: bool = True) -> tuple[dict, np.ndarray]:
    """The bank's index and its memory map once the bank holds the folder's current images: built
    when missing, rebuilt (saying why) when the files changed. The map is taken under the lock, so
    a rebuild by another process cannot slip new pixels under this index. Of torchrun's ranks,
    rank 0 calls it."""
    folder = Path(folder)
    with _exclusive(folder):
        index, stale = _current_index(folder, channels, workers)
        if stale is not None:
            if show_progress:
                print(f"bank: {stale}; decoding the images into {folder / BANK}")
            index = _build(folder, channels, workers, show_progress)
        return index, np.load(folder / BANK, mmap_mode="r")


def open(folder: str | Path, channels: int, workers: int | None = None) -> DistilledImages:
    """The distilled images of ``folder`` as a read-only view of its bank, which rank 0 checks and
    (re)builds when needed while the other ranks wait: they see the work directory rank 0 does, as
    relabel's shared memory maps already require.

    ``images`` maps the file without copying (``torch.from_numpy`` of the memory map, whose
    warning about non-writable arrays is expected): writing into it would crash, nothing does.
    """
    folder = Path(folder)
    if distributed.is_main():
        index, pixels = refresh(folder, channels, workers)
    distributed.barrier()
    if not distributed.is_main():
        index, stale = _read_index(folder, channels)
        if stale is not None:
            raise UserError(f"rank {distributed.rank()}: {stale}, although rank 0 has just made it current: every "
                            "rank must see rank 0's work directory (one shared file system)")
        pixels = np.load(folder / BANK, mmap_mode="r")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    return DistilledImages(images, torch.tensor(index["labels"], dtype=torch.int64), index["classes"],
                           index["files"], index["fingerprint"])


def register(subparsers) -> None:
    parser = subparsers.add_parser("bank", help="the image bank: distilled images decoded once into one array")
    actions = parser.add_subparsers(dest="action", required=True)
    command = actions.add_parser("build", help="decode an ImageFolder of same-size images (ours or another "
                                               "project's) into DIR/bank.npy + DIR/bank.json")
    command.add_argument("path", help="the image folder, e.g. runs/in1k/distilled")
    add_recipe_arguments(command)
    command.add_argument("--workers", type=int, default=None, help="decoding threads (default: one per CPU core)")
    command.set_defaults(func=_build_command)


def _build_command(args: argparse.Namespace) -> None:
    build(args.path, recipe_from_args(args).data.channels, args.workers)

"""Real and distilled images as uint8 [C, H, W] tensors, from the layouts people actually have.

Real data: Fashion-MNIST's original IDX files (Debian's ``dataset-fashion-mnist`` or a torchvision
download), any ImageFolder ``train/`` + ``val/`` tree (ImageNet-1K, ImageNet-21K-P) and the
Tiny-ImageNet layout. Nothing is downloaded; a wrong path or a damaged file is a ``UserError``
that says how to fix it. Folder listings are scanned in parallel and, given a cache folder (the
work directory's ``listings/``), kept between stages. Distilled data: the ImageFolder that
``lpld recover`` writes, listed here and decoded once into ``lpld.bank``, whose index order is
the label store's ``img_idx`` (SPEC.md section 11.3).
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from tqdm import tqdm

from . import distributed
from .atomic import exclusive, write_atomically
from .errors import UserError
from .fingerprint import tensors_sha256

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FMNIST_HELP = ("install Debian's package (`apt-get install dataset-fashion-mnist`, files in "
               "/usr/share/datasets/fashion-mnist) or point --data at a torchvision FashionMNIST download "
               "(its FashionMNIST/raw folder)")
IDX_UBYTE = 0x08
LISTING_FORMAT = "lpld-listing/1"
SETTLED_NS = 2 * 10**9  # a folder modified more recently than this is not cached (see list_images)


class RealImages(Dataset):
    """A labelled real split: item i is (transform(uint8 [C, H, W]), label).

    Images are either held in memory (``pixels``, Fashion-MNIST) or decoded from ``files`` on
    access (ImageFolder, Tiny-ImageNet), so DataLoader workers do the decoding.
    """

    def __init__(self, classes: list[str], targets: torch.Tensor, fingerprint: str, channels: int,
                 transform: Callable | None = None, pixels: torch.Tensor | None = None,
                 files: list[str] | None = None):
        self.classes, self.targets, self.fingerprint = classes, targets, fingerprint
        self.channels, self.transform, self.pixels, self.files = channels, transform, pixels, files

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        if self.pixels is not None:
            image = self.pixels[index].expand(self.channels, -1, -1)
        else:
            image = decode_file(self.files[index], self.channels)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


@dataclass(frozen=True)
class DistilledImages:
    """A synthetic set in one tensor; index i is image i of the sorted listing everywhere.

    ``images`` is a view of the image bank's read-only memory map (``lpld.bank``): shared between
    processes through the page cache, and never to be written (writing into it crashes).
    """

    images: torch.Tensor  # uint8 [N, C, H, W], a permuted view of the bank's [N, H, W, C]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    files: list[str]
    fingerprint: str


def decode_file(path: str, channels: int, encoded: torch.Tensor | None = None) -> torch.Tensor:
    """Decode one image file (or ``encoded``, its bytes already read) to uint8 [channels, H, W]
    (grey for 1 channel, RGB for 3)."""
    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(channels)
    if mode is None:
        raise UserError(f"data.channels must be 1 or 3 for image files, not {channels}")
    try:
        return decode_image(path if encoded is None else encoded, mode=mode)
    except RuntimeError as error:
        raise UserError(f"cannot decode image {path} ({error}); remove or replace the file") from None


def load_real(data, split: str, transform: Callable | None = None, cache: Path | None = None) -> RealImages:
    """The real ``split`` ("train" or "val") of ``data`` (a recipe's DataConfig).

    "val" is Fashion-MNIST's t10k set, an ImageFolder's val/ and Tiny-ImageNet's val/images with
    val_annotations.txt. The class list always comes from the train split, so labels agree.
    ``cache`` (``WorkDir.listings``) keeps folder listings between stages (``list_images``).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    if data.root is None:
        raise UserError(f"recipe data set {data.dataset!r} has no default location: pass --data PATH")
    root = Path(data.root)
    if not root.is_dir():
        hint = FMNIST_HELP if data.dataset == "fmnist" else "pass --data pointing at the data set's root folder"
        raise UserError(f"data folder {root} does not exist: {hint}")
    if data.dataset == "fmnist":
        dataset = _fashion_mnist(root, split, data.channels, transform)
    elif data.dataset in ("imagefolder", "tiny"):
        dataset = _folder_split(root, split, data.dataset, data.channels, transform, cache)
    else:
        raise UserError(f"unknown data.dataset {data.dataset!r}; choose fmnist, imagefolder or tiny")
    if len(dataset.classes) != data.num_classes:
        raise UserError(f"{root} has {len(dataset.classes)} classes but the recipe expects {data.num_classes}; "
                        f"check --data or --set data.num_classes={len(dataset.classes)}")
    return dataset


def _fashion_mnist(root: Path, split: str, channels: int, transform) -> RealImages:
    if channels not in (1, 3):
        raise UserError(f"Fashion-MNIST is greyscale: data.channels must be 1 or 3 (replicated), not {channels}")
    paths = [_find_idx(root, name) for name in FMNIST_FILES[split]]
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{paths[0]} and {paths[1]} do not form an image/label pair "
                        f"(shapes {images.shape} and {labels.shape}); {FMNIST_HELP}")
    if labels.size and labels.max() >= len(FMNIST_CLASSES):
        raise UserError(f"{paths[1]} has label {labels.max()}, Fashion-MNIST has 10 classes; {FMNIST_HELP}")
    pixels = torch.from_numpy(images).unsqueeze(1)
    targets = torch.from_numpy(labels.astype(np.int64))
    fingerprint = tensors_sha256({"images": pixels, "labels": targets})[:16]
    return RealImages(list(FMNIST_CLASSES), targets, fingerprint, channels, transform, pixels=pixels)


def _find_idx(root: Path, name: str) -> Path:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise UserError(f"{name}[.gz] not found in {root} or {root / 'FashionMNIST' / 'raw'}: {FMNIST_HELP}")


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (gzip or not) of unsigned bytes, checking its magic number and size."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{path} is damaged ({error}); {FMNIST_HELP}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UBYTE or not 1 <= raw[3] <= 4:
        raise UserError(f"{path} is not an IDX file of unsigned bytes (bad magic number); {FMNIST_HELP}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated (header incomplete); {FMNIST_HELP}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise UserError(f"{path} holds {len(raw) - header} bytes of data but its header says {shape} "
                        f"({int(np.prod(shape))} bytes): the file is truncated or damaged; {FMNIST_HELP}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _folder_split(root: Path, split: str, layout: str, channels: int, transform, cache: Path | None) -> RealImages:
    """ImageFolder ``<root>/<split>/<class>/*`` or Tiny-ImageNet (train/<wnid>/images, val/images)."""
    classes = _class_folders(root / "train")
    if layout == "tiny" and split == "val":
        files, labels = _tiny_val(root, classes)
        fingerprint = _listing_fingerprint((Path(f).parent.name, Path(f).name, os.path.getsize(f)) for f in files)
    else:
        folder = root / split
        if split == "val":
            unknown = sorted(set(_class_folders(folder)) - set(classes))
            if unknown:
                raise UserError(f"{folder} has class folders missing from {root / 'train'}: {unknown[:5]}; "
                                "train/ and val/ must name the same classes")
        class_dirs = [folder / name / "images" if layout == "tiny" else folder / name for name in classes]
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        cache_file = None if cache is None else cache / f"{key}-{split}.txt"
        found, fingerprint = list_images(class_dirs, cache_file)
        files, labels = [], []
        for label, (class_dir, names) in enumerate(zip(class_dirs, found)):
            if split == "train" and not names:
                raise UserError(f"class folder {class_dir} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                                "remove it or add its images")
            prefix = os.path.join(class_dir, "")  # joined as strings: Path joins cost 3 s per million files
            files += [prefix + name for name in names]
            labels += [label] * len(names)
    if not files:
        raise UserError(f"no images found for split {split!r} under {root}")
    return RealImages(classes, torch.tensor(labels, dtype=torch.int64), fingerprint, channels, transform, files=files)


def _class_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist: --data must hold train/<class>/... and val/... folders")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise UserError(f"{folder} has no class folders: expected {folder}/<class>/<image files>")
    return classes


def _tiny_val(root: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Tiny-ImageNet's val/images listed in val/val_annotations.txt (file, wnid, box)."""
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise UserError(f"{annotations} not found: the Tiny-ImageNet layout needs val/images and val_annotations.txt")
    index = {name: label for label, name in enumerate(classes)}
    files, labels = [], []
    for line_no, line in enumerate(annotations.read_text().splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise UserError(f"{annotations} line {line_no}: expected '<file>\\t<wnid>...' with a wnid of train/")
        path = root / "val" / "images" / fields[0]
        if not path.is_file():
            raise UserError(f"{path} (listed in {annotations}) does not exist")
        files.append(str(path))
        labels.append(index[fields[1]])
    order = sorted(range(len(files)), key=files.__getitem__)
    return [files[i] for i in order], [labels[i] for i in order]


def _listing_fingerprint(entries: Iterable[tuple[str, str, int]]) -> str:
    """Hash of (folder name, file name, size) per file: cheap even for ImageNet, and it changes if files do."""
    digest = hashlib.sha256()
    for folder, name, size in entries:
        digest.update(f"{folder}/{name}|{size}\n".encode())
    return digest.hexdigest()[:16]


class ImageFile(NamedTuple):
    """One image file of a folder listing, with what its stat says (for fingerprints and staleness checks).

    ``ctime_ns`` (the inode's change time) moves with every write and every change of mtime, and
    unlike mtime no tool can set it back.
    """

    name: str
    size: int
    ctime_ns: int


def scan_folders(folders: Sequence[Path]) -> list[list[ImageFile]]:
    """Each folder's image files sorted by name (none for a missing folder).

    One ``os.scandir`` per folder in a thread pool: at ImageNet-21K scale (11 M files in 21 k
    folders) the cost is system calls, which release the GIL, so threads overlap them.
    """
    with ThreadPoolExecutor() as pool:
        return list(tqdm(pool.map(_scan_folder, folders), total=len(folders), unit="folder", desc="list images",
                         leave=False, disable=len(folders) < 100 or not distributed.is_main()))


def _scan_folder(folder: Path) -> list[ImageFile]:
    try:
        with os.scandir(folder) as entries:
            found = [(entry.name, entry.stat()) for entry in entries
                     if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(ImageFile(name, stat.st_size, stat.st_ctime_ns) for name, stat in found)


def list_images(folders: Sequence[Path], cache_file: Path | None = None) -> tuple[list[list[str]], str]:
    """Each folder's sorted image file names, and the fingerprint of the listing (names and sizes).

    With ``cache_file`` the folders are scanned once and the listing is read back while every
    folder's mtime_ns is unchanged (adding, removing or renaming a file changes its folder's), so
    later stages and ranks read one file instead of stat'ing every image. A file rewritten in place
    under its old name goes unnoticed. One process at a time scans and writes the cache (a lock
    beside it): the ranks of a host starting together wait for the first one's scan instead of each
    scanning every folder. A folder modified in the last ``SETTLED_NS`` is not cached: a change
    within the timestamps' granularity could be missed.
    """
    if cache_file is None:
        return _scan_listing(folders)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(cache_file.with_name(cache_file.name + ".lock")):
        stamps = _folder_stamps(folders)
        if (cached := _read_listing(cache_file, folders, stamps)) is not None:
            return cached
        names, fingerprint = _scan_listing(folders)
        if all(time.time_ns() - stamp > SETTLED_NS for stamp in stamps):
            _write_listing(cache_file, folders, stamps, names, fingerprint)
        return names, fingerprint


def _scan_listing(folders: Sequence[Path]) -> tuple[list[list[str]], str]:
    scanned = scan_folders(folders)
    names = [[file.name for file in files] for files in scanned]
    return names, _listing_fingerprint((folder.name, file.name, file.size)
                                       for folder, files in zip(folders, scanned) for file in files)


def _folder_stamps(folders: Sequence[Path]) -> list[int]:
    """Each folder's mtime_ns (-1 when it does not exist)."""
    def stamp(folder: Path) -> int:
        try:
            return os.stat(folder).st_mtime_ns
        except FileNotFoundError:
            return -1
    with ThreadPoolExecutor() as pool:
        return list(pool.map(stamp, folders))


def _listing_header(folders: Sequence[Path], stamps: list[int]) -> dict:
    return {"format": LISTING_FORMAT, "folders": [os.path.abspath(folder) for folder in folders], "mtime_ns": stamps}


def _read_listing(path: Path, folders: Sequence[Path], stamps: list[int]) -> tuple[list[list[str]], str] | None:
    """The cached listing if ``path`` holds one of these folders at these mtimes, else None."""
    try:
        head, _, body = path.read_text().partition("\n")
        header = json.loads(head)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if {key: header.get(key) for key in ("format", "folders", "mtime_ns")} != _listing_header(folders, stamps):
        return None
    names = body.split("\n") if body else []
    if sum(header["counts"]) != len(names):
        return None
    offsets = [0, *itertools.accumulate(header["counts"])]
    return [names[a:b] for a, b in zip(offsets, offsets[1:])], header["fingerprint"]


def _write_listing(path: Path, folders: Sequence[Path], stamps: list[int], names: list[list[str]],
                   fingerprint: str) -> None:
    """One file: a JSON header line (folders, their mtimes, counts, fingerprint), then one file name per line."""
    if any("\n" in name for files in names for name in files):
        return
    header = {**_listing_header(folders, stamps), "counts": [len(files) for files in names], "fingerprint": fingerprint}
    text = "\n".join([json.dumps(header), *(name for files in names for name in files)])
    write_atomically(path, lambda partial: partial.write_text(text))


def distilled_listing(path: str | Path) -> dict[str, list[ImageFile]]:
    """Sorted class folder -> its image files sorted by name, for a synthetic ImageFolder (nothing decoded)."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"distilled image folder {root} does not exist: run `lpld recover` first")
    classes = _class_folders(root)
    listing = dict(zip(classes, scan_folders([root / name for name in classes])))
    for name, found in listing.items():
        if not found:
            raise UserError(f"distilled class folder {root / name} is empty: rerun `lpld recover`")
    return listing


def train_transform(data, scale: tuple[float, float] = (0.08, 1.0), kind: str = "rrc") -> v2.Compose:
    """Training augmentation on uint8 [C, H, W]: crop + flip, then float and the recipe's normalisation.

    kind "rrc": RandomResizedCrop(resolution, scale, bilinear) as in SPEC.md section 2 (the class-BN
    pass) and teacher training on ImageNet; "pad-crop": resize to the resolution, pad 2 and crop
    back (the usual small-image teacher augmentation).
    """
    if kind == "rrc":
        crop = [v2.RandomResizedCrop(data.resolution, scale=tuple(scale), antialias=True)]
    elif kind == "pad-crop":
        crop = [v2.Resize((data.resolution, data.resolution), antialias=True),
                v2.RandomCrop(data.resolution, padding=2)]
    else:
        raise UserError(f"unknown augmentation {kind!r}; choose rrc or pad-crop")
    return v2.Compose([*crop, v2.RandomHorizontalFlip(), *_to_normalized_float(data)])


def eval_transform(data) -> v2.Compose:
    """Evaluation view: Resize(eval_resize) + CenterCrop(eval_crop) when set (ImageNet), else the
    resolution; ``eval_squash`` resizes both sides to the resolution without a crop (ImageNet-21K-P)."""
    if data.eval_squash:
        return v2.Compose([v2.Resize((data.resolution, data.resolution), antialias=True), *_to_normalized_float(data)])
    resize = data.eval_resize or data.resolution
    crop = data.eval_crop or data.resolution
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(crop), *_to_normalized_float(data)])


def _to_normalized_float(data) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(data.mean), list(data.std))]

"""Data adapters on generated IDX files and folder trees, plus the real Debian Fashion-MNIST files."""
import gzip
import hashlib
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import write_jpeg, write_png

import lpld.data
from lpld.data import eval_transform, list_images, load_real, read_idx, train_transform
from lpld.errors import UserError
from lpld.recipes import RECIPES, DataConfig

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


pytestmark = pytest.mark.usefixtures("one_thread")


def idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def random_pixels(labels: np.ndarray, rng) -> np.ndarray:
    return rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)


def write_fmnist(folder: Path, n_train=12, n_val=5, compress=True, seed=0, pixels=random_pixels):
    """Small IDX files in the Fashion-MNIST names, labels 0..9 cycling; returns the arrays written.

    Other test files reuse it; ``pixels(labels, rng)`` makes the uint8 [n, 28, 28] images.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        arrays[f"{prefix}-images-idx3-ubyte"] = pixels(labels, rng)
        arrays[f"{prefix}-labels-idx1-ubyte"] = labels
    for name, array in arrays.items():
        data = idx_bytes(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def fmnist_config(root, **changes):
    return replace(RECIPES["fmnist"].data, root=str(root), **changes)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_parse_to_the_written_arrays(tmp_path, compress):
    arrays = write_fmnist(tmp_path, compress=compress)
    train, val = load_real(fmnist_config(tmp_path), "train"), load_real(fmnist_config(tmp_path), "val")
    assert len(train) == 12 and len(val) == 5 and train.classes[0] == "T-shirt/top"
    image, label = train[3]
    assert image.dtype == torch.uint8 and image.shape == (1, 28, 28)
    assert np.array_equal(image[0].numpy(), arrays["train-images-idx3-ubyte"][3]) and label == 3
    assert train.targets.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert train.fingerprint != val.fingerprint
    rgb = load_real(fmnist_config(tmp_path, channels=3), "val")[1][0]
    assert rgb.shape == (3, 28, 28) and torch.equal(rgb[0], rgb[2])


def test_torchvision_download_layout_is_accepted(tmp_path):
    write_fmnist(tmp_path / "FashionMNIST" / "raw", compress=False)
    assert len(load_real(fmnist_config(tmp_path), "train")) == 12


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-7], "truncated"),
    (lambda raw: b"\x00\x00\x0d\x03" + raw[4:], "magic"),
    (lambda raw: raw[:6], "truncated"),
])
def test_damaged_idx_files_are_user_errors(tmp_path, damage, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))))
    with pytest.raises(UserError, match=message):
        read_idx(path)


def test_broken_gzip_and_missing_or_mismatched_files(tmp_path):
    write_fmnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(UserError, match="damaged"):
        load_real(fmnist_config(tmp_path), "train")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_real(fmnist_config(tmp_path), "val")
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_real(fmnist_config(tmp_path / "nowhere"), "val")
    other = tmp_path / "other"
    write_fmnist(other)
    (other / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4, dtype=np.uint8))))
    with pytest.raises(UserError, match="pair"):
        load_real(fmnist_config(other), "val")
    with pytest.raises(UserError, match="expects 7"):
        load_real(fmnist_config(other, num_classes=7), "train")


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_files():
    data = RECIPES["fmnist"].data
    train, val = load_real(data, "train"), load_real(data, "val")
    assert (len(train), len(val)) == (60000, 10000)
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert torch.bincount(val.targets).tolist() == [1000] * 10
    pixels = train.pixels[:2000].double() / 255
    assert abs(pixels.mean().item() - data.mean[0]) < 0.01 and abs(pixels.std().item() - data.std[0]) < 0.01


def write_images(folder: Path, count: int, size=(3, 10, 12), value=0, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = torch.full(size, value + i, dtype=torch.uint8)
        path = str(folder / f"img{i:02d}{suffix}")
        write_png(image, path) if suffix == ".png" else write_jpeg(image, path)


def image_folder(root: Path, classes=("cat", "ant", "bee"), per_class=3):
    for k, name in enumerate(classes):
        write_images(root / "train" / name, per_class, value=40 * k)
        write_images(root / "val" / name, 2, value=40 * k + 10)
    return DataConfig("imagefolder", num_classes=len(classes), resolution=8, root=str(root))


def test_image_folder_split_and_labels(tmp_path):
    data = image_folder(tmp_path)
    train, val = load_real(data, "train"), load_real(data, "val", eval_transform(data))
    assert train.classes == ["ant", "bee", "cat"] and val.classes == train.classes
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and val.targets.tolist() == [0, 0, 1, 1, 2, 2]
    image, label = train[4]  # bee (written second, value 80 + 1)
    assert image.shape == (3, 10, 12) and int(image[0, 0, 0]) == 81 and label == 1
    x, _ = val[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    augmented, _ = load_real(data, "train", train_transform(data))[0]
    assert augmented.shape == (3, 8, 8)
    grey = load_real(replace(data, channels=1), "train")[0][0]
    assert grey.shape == (1, 10, 12)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_real(DataConfig("imagefolder", num_classes=3, resolution=8, root=str(tmp_path / "nope")), "train")
    data = image_folder(tmp_path)
    with pytest.raises(UserError, match="expects 5"):
        load_real(replace(data, num_classes=5), "train")
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_real(replace(data, num_classes=4), "train")
    (tmp_path / "train" / "dog").rmdir()
    write_images(tmp_path / "val" / "zebra", 1)
    with pytest.raises(UserError, match="zebra"):
        load_real(data, "val")
    with pytest.raises(UserError, match="--data"):
        load_real(replace(data, root=None), "train")


def test_tiny_imagenet_layout(tmp_path):
    wnids = ["n02", "n01"]
    for k, wnid in enumerate(wnids):
        write_images(tmp_path / "train" / wnid / "images", 2, size=(3, 8, 8), suffix=".JPEG")
    write_images(tmp_path / "val" / "images", 3, size=(3, 8, 8), suffix=".JPEG")
    lines = ["img00.JPEG\tn02\t0\t0\t8\t8", "img01.JPEG\tn01\t0\t0\t8\t8", "img02.JPEG\tn02\t1\t1\t7\t7"]
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    data = DataConfig("tiny", num_classes=2, resolution=8, root=str(tmp_path))
    train, val = load_real(data, "train"), load_real(data, "val")
    assert train.classes == ["n01", "n02"] and train.targets.tolist() == [0, 0, 1, 1]
    assert val.targets.tolist() == [1, 0, 1] and val[0][0].shape == (3, 8, 8)
    (tmp_path / "val" / "val_annotations.txt").write_text("img00.JPEG\tn99\n")
    with pytest.raises(UserError, match="wnid"):
        load_real(data, "val")
    (tmp_path / "val" / "val_annotations.txt").unlink()
    with pytest.raises(UserError, match="val_annotations"):
        load_real(data, "val")


def test_eval_views_follow_the_recipe():
    """ImageNet: shorter side 256 then a 224 center crop; ImageNet-21K-P: squash to 224 x 224 (no crop)."""
    from lpld.recipes import RECIPES

    image = torch.arange(3 * 300 * 400, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 300, 400)
    in1k = eval_transform(RECIPES["imagenet1k"].data)(image)
    assert in1k.shape == (3, 224, 224)
    resized = TF.resize(image, 256, antialias=True)
    expected = TF.center_crop(resized, [224, 224]).float() / 255
    mean = torch.tensor(RECIPES["imagenet1k"].data.mean).view(3, 1, 1)
    std = torch.tensor(RECIPES["imagenet1k"].data.std).view(3, 1, 1)
    torch.testing.assert_close(in1k, (expected - mean) / std)
    squashed = eval_transform(RECIPES["imagenet21k"].data)(image)
    direct = TF.resize(image, [224, 224], antialias=True).float() / 255
    torch.testing.assert_close(squashed, direct)  # mean 0, std 1: [0, 1] pixels


def settle(*folders: Path) -> None:
    """Date folders 10 s back, as a data set at rest is (data.SETTLED_NS keeps fresh folders uncached)."""
    past = time.time_ns() - 10**10
    for folder in folders:
        os.utime(folder, ns=(past, past))


def test_listing_equals_a_sorted_walk(tmp_path):
    data = image_folder(tmp_path, per_class=4)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    write_images(tmp_path / "train" / "ant", 1, suffix=".JPEG")  # img00.JPEG next to img00.png
    train = load_real(data, "train", cache=tmp_path / "listings")
    expected, labels, fingerprint = [], [], hashlib.sha256()
    classes = sorted(next(os.walk(tmp_path / "train"))[1])
    for label, name in enumerate(classes):
        folder, _, files = next(os.walk(tmp_path / "train" / name))
        for file in sorted(f for f in files if f.lower().endswith((".png", ".jpeg", ".jpg", ".webp"))):
            expected.append(os.path.join(folder, file))
            labels.append(label)
            fingerprint.update(f"{name}/{file}|{os.path.getsize(os.path.join(folder, file))}\n".encode())
    assert train.classes == classes == ["ant", "bee", "cat"]
    assert train.files == expected and train.targets.tolist() == labels
    assert train.fingerprint == fingerprint.hexdigest()[:16]  # the value earlier versions recorded


def test_listing_cache_is_read_back_until_a_folder_changes(tmp_path, monkeypatch):
    data = image_folder(tmp_path)
    cache = tmp_path / "run" / "listings"
    settle(*(tmp_path / "train").iterdir())
    first = load_real(data, "train", cache=cache)
    assert len(list(cache.glob("*.txt"))) == 1  # beside its lock
    scans = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: scans.append(Path(path)) or real_scandir(path))
    again = load_real(data, "train", cache=cache)
    assert scans == [tmp_path / "train"]  # the class list only: no class folder was scanned
    assert (again.files, again.targets.tolist(), again.fingerprint) == (first.files, first.targets.tolist(),
                                                                       first.fingerprint)

    write_images(tmp_path / "train" / "bee", 4)  # img03.png is new, and bee's mtime is now
    scans.clear()
    changed = load_real(data, "train", cache=cache)
    assert tmp_path / "train" / "bee" in scans
    assert len(changed) == len(first) + 1 and str(tmp_path / "train" / "bee" / "img03.png") in changed.files
    assert changed.fingerprint != first.fingerprint
    settle(tmp_path / "train" / "bee")
    assert load_real(data, "train", cache=cache).files == changed.files  # scanned again and cached
    scans.clear()
    assert load_real(data, "train", cache=cache).files == changed.files and scans == [tmp_path / "train"]


def test_processes_listing_at_once_scan_once(tmp_path, monkeypatch):
    """The ranks of a host start together: the first scans and caches, the others wait and read it."""
    image_folder(tmp_path)
    folders = sorted((tmp_path / "train").iterdir())
    settle(*folders)
    scans = []
    real_scan = lpld.data.scan_folders
    monkeypatch.setattr(lpld.data, "scan_folders", lambda found: scans.append(found) or real_scan(found))
    cache = tmp_path / "listings" / "train.txt"
    with ThreadPoolExecutor(3) as pool:  # flock excludes open files, so threads stand in for processes
        results = list(pool.map(lambda _: list_images(folders, cache), range(3)))
    assert len(scans) == 1 and results[0] == results[1] == results[2] == list_images(folders)
    assert len(scans) == 2  # without a cache file the folders are scanned

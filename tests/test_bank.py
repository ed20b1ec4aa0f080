"""The image bank against the files it was decoded from: pixels bit for bit, the streamed fingerprint,
rebuilds when files change, and every replay loader giving the batches an in-memory tensor gives."""
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.io import ImageReadMode, decode_image, write_jpeg, write_png

from lpld import bank, replay
from lpld.cli import main
from lpld.errors import UserError

from test_data import write_images
from test_replay import MEAN, STD, make_store, plan_of, random_images

pytestmark = pytest.mark.usefixtures("one_thread")


def write_folder(root: Path, images: torch.Tensor, classes: int, suffix: str = "png") -> list[Path]:
    """Image i in class folder i % classes (folders written in reverse: the listing must sort them)."""
    paths = []
    for i in reversed(range(len(images))):
        folder = root / f"c{i % classes:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:03d}.{suffix}"
        write_png(images[i], str(path)) if suffix == "png" else write_jpeg(images[i], str(path), quality=90)
        paths.append(path)
    return sorted(paths)


def mapped_files() -> dict[str, list[tuple[int, int]]]:
    """Path -> the address ranges this process maps it at (/proc/self/maps)."""
    maps = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            maps.setdefault(fields[5], []).append((start, end))
    return maps


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_bank_holds_the_decoded_files_bit_for_bit(tmp_path, suffix):
    images = random_images(n=7, channels=3, side=9, seed=1)
    paths = write_folder(tmp_path, images, classes=3, suffix=suffix)
    distilled = bank.open(tmp_path, 3)
    assert distilled.classes == ["c00000", "c00001", "c00002"]
    assert distilled.files == [f"{p.parent.name}/{p.name}" for p in paths]
    assert distilled.labels.tolist() == [int(p.parent.name[1:]) for p in paths]
    assert distilled.images.shape == (7, 3, 9, 9) and distilled.images.dtype == torch.uint8
    for image, path in zip(distilled.images, paths):
        assert torch.equal(image, decode_image(str(path), mode=ImageReadMode.RGB))
    if suffix == "png":  # lossless: the bank holds the very pixels written
        assert torch.equal(distilled.images, images[[int(p.stem[3:]) for p in paths]])
    reference = hashlib.sha256()
    for path in paths:
        data = path.read_bytes()
        reference.update(f"{path.parent.name}/{path.name}|{len(data)}|{hashlib.sha256(data).hexdigest()}\n".encode())
    assert distilled.fingerprint == reference.hexdigest()[:16]
    # A view of the memory-mapped file, not a copy: its first pixel lies in a mapping of bank.npy.
    ranges = mapped_files()[str((tmp_path / bank.BANK).resolve())]
    assert any(start <= distilled.images.data_ptr() < end for start, end in ranges)
    assert np.load(tmp_path / bank.BANK).shape == (7, 9, 9, 3)


def test_grey_images_and_bad_folders(tmp_path):
    for k, name in enumerate(["c00001", "c00000"]):
        write_images(tmp_path / name, 3, size=(1, 6, 6), value=50 * k)
    distilled = bank.open(tmp_path, channels=1)
    assert distilled.classes == ["c00000", "c00001"] and distilled.images.shape == (6, 1, 6, 6)
    assert distilled.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert distilled.files[:2] == ["c00000/img00.png", "c00000/img01.png"]
    assert distilled.images[:, 0, 0, 0].tolist() == [50, 51, 52, 0, 1, 2]
    assert bank.open(tmp_path, channels=3).images.shape == (6, 3, 6, 6)  # another decode: rebuilt
    assert main(["bank", "build", str(tmp_path), "--recipe", "fmnist"]) == 0  # Fashion-MNIST: grey
    assert np.load(tmp_path / bank.BANK).shape == (6, 6, 6, 1)
    write_images(tmp_path / "c00002", 1, size=(1, 7, 6))
    with pytest.raises(UserError, match="size"):
        bank.open(tmp_path, channels=1)
    assert not (tmp_path / f"{bank.BANK}.partial").exists() and not (tmp_path / bank.INDEX).exists()
    (tmp_path / "c00003").mkdir()
    with pytest.raises(UserError, match="empty"):
        bank.open(tmp_path, channels=1)
    with pytest.raises(UserError, match="lpld recover"):
        bank.open(tmp_path / "missing", channels=1)


def test_a_bad_image_stops_the_build_without_decoding_the_rest(tmp_path, monkeypatch):
    write_images(tmp_path / "c00000", 1, size=(1, 6, 6))
    write_images(tmp_path / "c00001", 1, size=(1, 7, 6))  # the second image is of another size
    write_images(tmp_path / "c00002", 40, size=(1, 6, 6))
    decoded = []
    real_decode = bank.decode_file
    monkeypatch.setattr(bank, "decode_file", lambda *args: decoded.append(args[0]) or real_decode(*args))
    monkeypatch.setattr(bank, "CHUNK", 1)
    with pytest.raises(UserError, match="size"):
        bank.build(tmp_path, 1, workers=1, show_progress=False)
    assert len(decoded) < 10  # the queued chunks were cancelled, not decoded before the error surfaced


def test_changed_files_are_noticed(tmp_path, monkeypatch, capsys):
    images = random_images(n=6, channels=3, side=8, seed=2)
    paths = write_folder(tmp_path, images, classes=2)
    first = bank.open(tmp_path, 3)
    assert "no image bank yet" in capsys.readouterr().out

    builds = []
    real_build = bank._build
    monkeypatch.setattr(bank, "_build", lambda *args: builds.append(args) or real_build(*args))
    assert bank.open(tmp_path, 3).fingerprint == first.fingerprint and not builds  # unchanged: reused

    os.utime(paths[0], ns=(1, 1))  # new times, same bytes: kept, after one streamed hash
    assert bank.open(tmp_path, 3).fingerprint == first.fingerprint and not builds
    with monkeypatch.context() as patched:
        hashed = []
        patched.setattr(bank, "file_sha256", lambda path: hashed.append(path))
        bank.open(tmp_path, 3)
        assert not hashed  # the new times were recorded, so the cheap check passes again

    changed = images[0].clone()
    changed[0, 0, 0] ^= 1
    write_png(changed, str(paths[0]))
    os.utime(paths[0], ns=(1, 1))  # mtime set back as `cp -p` would: the change time still moved
    rebuilt = bank.open(tmp_path, 3)
    assert "changed since" in capsys.readouterr().out and len(builds) == 1
    assert rebuilt.fingerprint != first.fingerprint and torch.equal(rebuilt.images[0], changed)

    write_png(images[1], str(paths[0].parent / "img100.png"))
    more = bank.open(tmp_path, 3)
    assert "added, removed or renamed" in capsys.readouterr().out and len(more.images) == 7 and len(builds) == 2


def test_processes_opening_a_missing_bank_at_once_build_it_once(tmp_path, monkeypatch):
    write_folder(tmp_path, random_images(n=6, channels=3, side=8, seed=4), classes=2)
    builds = []
    real_build = bank._build
    monkeypatch.setattr(bank, "_build", lambda *args: builds.append(args) or real_build(*args))
    with ThreadPoolExecutor(2) as pool:  # flock excludes open files, so two threads stand in for two processes
        first, second = pool.map(lambda _: bank.open(tmp_path, 3), range(2))
    assert len(builds) == 1 and first.fingerprint == second.fingerprint
    assert torch.equal(first.images, second.images)


def _open_as_rank(rank, root):
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    try:
        distilled = bank.open(root / "distilled", 3)
        (root / f"rank{rank}.json").write_text(json.dumps([distilled.fingerprint, int(distilled.images.sum())]))
    finally:
        dist.destroy_process_group()


def test_ranks_open_the_bank_rank_0_builds(tmp_path):
    write_folder(tmp_path / "distilled", random_images(n=6, channels=3, side=8, seed=5), classes=2)
    mp.spawn(_open_as_rank, args=(tmp_path,), nprocs=2)
    expected = bank.open(tmp_path / "distilled", 3)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [expected.fingerprint,
                                                                           int(expected.images.sum())]


def _stacked(folder: Path, files: list[str]) -> torch.Tensor:
    """The old way: every file decoded into one in-memory tensor."""
    return torch.stack([decode_image(str(folder / f), mode=ImageReadMode.RGB) for f in files])


@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=pytest.mark.dali)])
@pytest.mark.parametrize("mix,flip", [("cutmix", "flip"), ("none", "cutout")])
def test_loaders_reading_the_bank_yield_the_batches_of_an_in_memory_tensor(tmp_path, mix, flip, kind):
    write_folder(tmp_path / "distilled", random_images(n=10, channels=3, side=16, seed=3), classes=2)
    distilled = bank.open(tmp_path / "distilled", 3)
    in_memory = _stacked(tmp_path / "distilled", distilled.files)
    assert not distilled.images.is_contiguous() and in_memory.is_contiguous()
    store, _ = make_store(tmp_path / "labels", in_memory, mix=mix, flip=flip)
    sampler = replay.PlanSampler(plan_of(store))
    from_bank, from_memory = (replay.make_loader(kind, store, images, sampler, 12, MEAN, STD, torch.device("cpu"),
                                                 workers=1) for images in (distilled.images, in_memory))
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        pairs = list(zip(from_bank, from_memory, strict=True))
        assert [a.record for a, _ in pairs] == sampler.records(epoch)
        for a, b in pairs:
            assert a.record == b.record and torch.equal(a.images, b.images) and torch.equal(a.logits, b.logits)


def test_a_store_labelled_before_the_bank_is_refused_with_a_relabel_message(tmp_path):
    from lpld import relabel, train
    from lpld.fingerprint import tensors_sha256
    from test_train import tiny_run

    recipe, workdir = tiny_run(tmp_path)
    distilled = bank.open(workdir.distilled, 3)
    pixel_hash = tensors_sha256({"images": distilled.images, "labels": distilled.labels})[:16]  # the former identity
    header = relabel.label_header(recipe, distilled.images, pixel_hash, "teacher")
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(recipe.data.num_classes))
    relabel.generate(teacher, distilled.images, tmp_path / "old-labels", header)
    with pytest.raises(UserError, match="lpld relabel"):
        train.train(recipe, workdir, tmp_path / "old-labels", "old", "cpu")

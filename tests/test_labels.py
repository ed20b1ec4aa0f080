"""Label store: what is written is what is read, and damaged or mismatched stores are refused at open."""
import argparse
import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from lpld import augment, fingerprint, labels, stamp
from lpld.errors import UserError
from lpld.labels import LabelStore, LabelStoreWriter
from lpld.stamp import file_state

N, B, K, C, E, SIZE = 23, 5, 7, 3, 3, 16  # nb = 4: the last 3 images of each epoch order are not labelled


def _header(flip="flip", mix="cutmix"):
    return {
        "num_images": N, "channels": C, "image_size": [20, 24], "batch_size": B, "num_classes": K, "epochs": E,
        "batches_per_epoch": N // B, "size": SIZE, "flip": flip, "mix": mix, "seeds": {"relabel": 1},
        "prune": [], "dataset_fingerprint": "d", "teacher_fingerprint": "t",
    }


def _random_record(generator, flip, mix):
    record = augment.Record(
        img_idx=torch.randperm(N, generator=generator)[:B].numpy(),
        crop=augment.sample_crop_boxes(generator, B, 20, 24),
        flip=augment.sample_flips(generator, B),
        logits=(torch.randn(B, K, generator=generator) * 10).to(torch.float16).numpy(),
    )
    if flip == "cutout":
        record.cutout = augment.sample_cutout(generator, B, SIZE, SIZE, C)
    if mix == "cutmix":
        mix_ = augment.sample_cutmix(generator, B, SIZE, SIZE)
        record.mix_perm, record.mix_lam, record.mix_box = mix_.perm, mix_.lam, mix_.box
    return record


def write_store(path, ids, flip="flip", mix="cutmix", seed=0, topk=0, quant="fp16"):
    generator = torch.Generator().manual_seed(seed)
    writer = LabelStoreWriter(path, dict(_header(flip, mix), topk=topk, quant=quant), ids)
    written = {}
    for row, g in enumerate(ids):
        written[int(g)] = _random_record(generator, flip, mix)
        writer.write(row, written[int(g)])
    writer.finish()
    return written


@pytest.mark.parametrize("flip,mix", [("flip", "cutmix"), ("cutout", "none")])
def test_round_trip(tmp_path, flip, mix):
    ids = np.array([0, 3, 4, 9, 11])
    written = write_store(tmp_path / "s", ids, flip, mix)
    store = LabelStore.open(tmp_path / "s", expect_images=N, expect_classes=K)
    assert len(store) == 5 and store.batches_per_epoch == 4 and store.ids.tolist() == ids.tolist()
    for g, want in written.items():
        got = store.record(g)
        for name in ("img_idx", "crop", "flip", "logits"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        assert got.logits.dtype == np.float16
        if mix == "cutmix":
            np.testing.assert_array_equal(got.mix_perm, want.mix_perm)
            np.testing.assert_array_equal(got.mix_box, want.mix_box)
            assert got.mix_lam == want.mix_lam
        else:
            assert got.mix_perm is None and got.mix_lam is None
        if flip == "cutout":
            np.testing.assert_array_equal(got.cutout.box, want.cutout.box)
            np.testing.assert_array_equal(got.cutout.fill, want.cutout.fill)
        else:
            assert got.cutout is None
    with pytest.raises(KeyError):
        store.record(1)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["num_records"] == 5 and all(len(a["sha256"]) == 64 for a in meta["arrays"].values())


def test_store_pickles_without_its_memmaps(tmp_path):
    written = write_store(tmp_path / "s", np.arange(4))
    store = LabelStore.open(tmp_path / "s")
    store.record(2)
    assert store._arrays
    copy = pickle.loads(pickle.dumps(store))
    assert copy._arrays == {}
    np.testing.assert_array_equal(copy.record(2).logits, written[2].logits)


@pytest.fixture
def store_path(tmp_path):
    write_store(tmp_path / "s", np.arange(12))
    return tmp_path / "s"


def test_flipped_byte_is_detected(store_path):
    data = bytearray((store_path / "logits.npy").read_bytes())
    data[-3] ^= 0x01
    (store_path / "logits.npy").write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        LabelStore.open(store_path)
    LabelStore.open(store_path, verify_checksums=False)  # the opt-out still checks sizes, not bytes


def test_truncated_file_is_detected_even_without_checksums(store_path):
    data = (store_path / "crop.npy").read_bytes()
    (store_path / "crop.npy").write_bytes(data[:-16])
    with pytest.raises(UserError, match="truncated"):
        LabelStore.open(store_path, verify_checksums=False)


def test_missing_file_and_wrong_dtype_are_refused(store_path):
    np.save(store_path / "logits.npy", np.zeros((12, B, K), dtype=np.float32))
    with pytest.raises(UserError, match="float32|<f4"):
        LabelStore.open(store_path, verify_checksums=False)
    (store_path / "flip.npy").unlink()
    with pytest.raises(UserError, match="flip.npy is missing"):
        LabelStore.open(store_path)


def test_pickled_array_is_refused(store_path):
    np.save(store_path / "flip.npy", np.empty((12, B), dtype=object), allow_pickle=True)
    with pytest.raises(UserError):
        LabelStore.open(store_path, verify_checksums=False)


def test_mismatched_counts_are_refused(store_path):
    with pytest.raises(UserError, match="23 images, but 24"):
        LabelStore.open(store_path, expect_images=24)
    with pytest.raises(UserError, match="7 classes, but 1000"):
        LabelStore.open(store_path, expect_classes=1000)
    meta = json.loads((store_path / "meta.json").read_text())
    meta["num_classes"] = 8  # meta edited: the arrays no longer match what it declares
    (store_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="logits"):
        LabelStore.open(store_path, verify_checksums=False)
    del meta["arrays"]["crop"]["sha256"]
    (store_path / "meta.json").write_text(json.dumps(dict(meta, num_classes=K)))
    with pytest.raises(UserError, match="sha256 of crop"):
        LabelStore.open(store_path, verify_checksums=False)
    del meta["epochs"]
    (store_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="lacks epochs"):
        LabelStore.open(store_path)


def test_out_of_range_image_index_is_refused(tmp_path):
    writer = LabelStoreWriter(tmp_path / "s", _header(), np.arange(2))
    record = _random_record(torch.Generator().manual_seed(0), "flip", "cutmix")
    record.img_idx = np.full(B, N)
    writer.write(0, record)
    writer.write(1, record)
    writer.finish()
    with pytest.raises(UserError, match="image indices"):
        LabelStore.open(tmp_path / "s")


def test_unfinished_store_and_other_settings_are_refused(tmp_path):
    LabelStoreWriter(tmp_path / "s", _header(), np.arange(4))
    with pytest.raises(UserError, match="did not finish"):
        LabelStore.open(tmp_path / "s")
    with pytest.raises(UserError, match="batch_size"):
        LabelStoreWriter(tmp_path / "s", dict(_header(), batch_size=4, batches_per_epoch=5), np.arange(4))
    with pytest.raises(UserError, match="no label store"):
        LabelStore.open(tmp_path / "nothing")


def test_info_reports_bytes_and_compression(store_path, capsys):
    store = LabelStore.open(store_path)
    report = labels.storage_report(store)
    per_record = B * K * 2 + B * 4 + B * 16 + B + B * 4 + 8 + 16 + 8  # logits, img_idx, crop, flip, perm, lam, box, id
    assert report["full_records"] == 12 and report["compression_factor"] == 1.0
    assert report["full_bytes"] == per_record * 12
    assert report["paper_logit_bytes"] == E * N * K * 2
    assert report["bytes_on_disk"] == sum(p.stat().st_size for p in store_path.iterdir() if p.name != labels.VERIFIED)
    parser = argparse.ArgumentParser()
    labels.register(parser.add_subparsers())
    args = parser.parse_args(["labels", "info", str(store_path)])
    args.func(args)
    assert "compression  1.00x" in capsys.readouterr().out


def test_topk_store_keeps_the_k_largest_logits(tmp_path):
    from lpld_kernels import soft_kl_div

    written = write_store(tmp_path / "s", np.arange(4), topk=3)
    store = LabelStore.open(tmp_path / "s")
    assert "logits" not in store.specs and store.array("topk_indices").dtype == np.uint8  # K <= 256
    for g, want in written.items():
        full = torch.from_numpy(want.logits).double()
        top = full.topk(3, dim=-1)
        reference = torch.full_like(full, float("-inf")).scatter(-1, top.indices, top.values)
        got = torch.from_numpy(store.record(g).logits)
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.double(), reference, rtol=0, atol=0)
        # softmax of the stored row is the renormalized top-3 distribution, and the KD loss stays finite
        probs = torch.softmax(full, -1).gather(-1, top.indices)
        torch.testing.assert_close(torch.softmax(got.double(), -1).gather(-1, top.indices), probs / probs.sum(-1, keepdim=True))
        assert torch.isfinite(soft_kl_div(torch.randn(B, K), got.float(), temperature=4.0, backend="torch"))


def test_a_topk_store_with_the_first_releases_int16_indices_still_opens(tmp_path):
    """lpld 0.1 stored top-k indices as int16 for any K up to 2^15; such a store reads back the same."""
    write_store(tmp_path / "s", np.arange(4), topk=3)
    new = LabelStore.open(tmp_path / "s")
    expected = {g: new.record(g).logits for g in new.ids}
    file = tmp_path / "s" / "topk_indices.npy"
    np.save(file, np.load(file).astype(np.int16))
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["arrays"]["topk_indices"].update(dtype=np.dtype(np.int16).str, sha256=hashlib.sha256(file.read_bytes()).hexdigest())
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "s" / labels.VERIFIED).unlink()
    old = LabelStore.open(tmp_path / "s")
    assert old.array("topk_indices").dtype == np.int16
    for g, logits in expected.items():
        np.testing.assert_array_equal(old.record(g).logits, logits)


def _codec_bound(quant, reference):
    """Largest error each codec may make on fp16 logits [..., k] (float64), from its number format alone."""
    if quant == "int8":  # half a step of (max - min) / 255, plus fp16 rounding of the scale and offset
        spread = reference.max(-1, keepdim=True).values - reference.min(-1, keepdim=True).values
        return spread / 255 / 2 + 256 * spread / 255 * 2**-11 + reference.abs().max(-1, keepdim=True).values * 2**-11
    shifted = reference - reference.max(-1, keepdim=True).values  # fp8 e4m3: 3 mantissa bits, subnormals below 2^-6
    return shifted.abs() * 2**-4 + 2**-10


@pytest.mark.parametrize("topk", [0, 3])
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_quantized_logits_stay_within_their_format_bound(tmp_path, topk, quant):
    written = write_store(tmp_path / "s", np.arange(4), topk=topk, quant=quant)
    store = LabelStore.open(tmp_path / "s")
    value_name = "topk_values" if topk else "logits"
    assert store.array(value_name).dtype == np.uint8 and ("logit_scale" in store.specs) == (quant == "int8")
    for g, want in written.items():
        full = torch.from_numpy(want.logits).double()
        kept = full.topk(topk, dim=-1) if topk else None
        reference = kept.values if topk else full
        got = torch.from_numpy(store.record(g).logits).double()
        if topk:
            assert torch.equal(torch.isfinite(got), torch.zeros_like(got, dtype=torch.bool).scatter(-1, kept.indices, True))
            got = got.gather(-1, kept.indices)
        if quant == "fp8":  # stored relative to the sample maximum: compare after the same shift
            reference = reference - reference.max(-1, keepdim=True).values
        assert ((got - reference).abs() <= _codec_bound(quant, reference)).all()


def test_quantization_changes_the_soft_labels_little(tmp_path):
    """What training sees, softmax(z / T) at the demo's T = 20, on logits spread over +-30: int8 moves
    it by < 1e-3; fp8 (3 mantissa bits, ~6% of each logit's distance to the top) by < 1e-2."""
    for quant, atol in (("int8", 1e-3), ("fp8", 1e-2)):
        written = write_store(tmp_path / quant, np.arange(4), quant=quant)
        store = LabelStore.open(tmp_path / quant)
        for g, want in written.items():
            target = torch.softmax(torch.from_numpy(want.logits).double() / 20, -1)
            got = torch.softmax(torch.from_numpy(store.record(g).logits).double() / 20, -1)
            torch.testing.assert_close(got, target, atol=atol, rtol=0)


def test_logit_bytes_and_compression_of_each_codec(tmp_path):
    for topk, quant, per_sample in ((0, "fp16", K * 2), (0, "int8", K + 4), (0, "fp8", K), (3, "fp16", 3 * 2 + 3),
                                    (3, "int8", 3 + 4 + 3), (3, "fp8", 3 + 3)):
        path = tmp_path / f"{topk}{quant}"
        write_store(path, np.arange(6), topk=topk, quant=quant)
        report = labels.storage_report(LabelStore.open(path))
        assert report["logit_bytes"] == 6 * B * per_sample
        assert report["logit_compression"] == pytest.approx(E * (N // B) * B * K * 2 / (6 * B * per_sample))


def test_unknown_codec_is_refused(tmp_path):
    with pytest.raises(UserError, match="quantization 'int4'"):
        write_store(tmp_path / "s", np.arange(2), quant="int4")
    with pytest.raises(UserError, match="--topk 8"):
        write_store(tmp_path / "t", np.arange(2), topk=K + 1)


@pytest.fixture
def hash_calls(monkeypatch):
    """Names of the array files hashed (the stamp's hashing is the store's only caller of file_sha256 on arrays)."""
    calls = []

    def counting(path, *args):
        calls.append(path.name)
        return fingerprint.file_sha256(path, *args)

    monkeypatch.setattr(stamp, "file_sha256", counting)
    return calls


def _flip_byte(file, keep_times=False):
    before = file.stat()
    with open(file, "r+b") as handle:
        handle.seek(-3, 2)
        byte = handle.read(1)[0]
        handle.seek(-3, 2)
        handle.write(bytes([byte ^ 0x01]))
    if keep_times:
        os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_file_sha256_streams_across_chunks(tmp_path):
    data = np.random.default_rng(0).bytes(1000)
    (tmp_path / "f").write_bytes(data)
    for chunk in (7, 1000, 1 << 20):
        assert fingerprint.file_sha256(tmp_path / "f", chunk) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert fingerprint.file_sha256(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_finish_stamps_the_store_and_later_opens_do_not_hash(store_path, hash_calls):
    meta = json.loads((store_path / "meta.json").read_text())
    stamp = json.loads((store_path / labels.VERIFIED).read_text())
    assert sorted(stamp["arrays"]) == sorted(meta["arrays"])
    for name, entry in stamp["arrays"].items():
        file = store_path / f"{name}.npy"
        assert entry["sha256"] == meta["arrays"][name]["sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
        assert (entry["size"], entry["mtime_ns"]) == (file.stat().st_size, file.stat().st_mtime_ns)
    assert LabelStore.open(store_path).hashed == {} and hash_calls == []
    (store_path / labels.VERIFIED).write_text("{")  # an unreadable stamp is no stamp: hash all, stamp again
    assert sorted(LabelStore.open(store_path).hashed) == sorted(meta["arrays"])
    hash_calls.clear()
    LabelStore.open(store_path)
    assert hash_calls == []


def test_only_arrays_whose_file_changed_are_hashed_again(store_path, hash_calls):
    crop = store_path / "crop.npy"
    os.utime(crop, ns=(crop.stat().st_atime_ns, crop.stat().st_mtime_ns + 10**9))  # touched, same bytes
    LabelStore.open(store_path)
    assert hash_calls == ["crop.npy"]
    _flip_byte(store_path / "logits.npy")
    with pytest.raises(UserError, match="logits.npy: sha256 differs"):
        LabelStore.open(store_path)
    assert hash_calls == ["crop.npy", "logits.npy"]


def test_a_copy_keeping_mtimes_and_an_edit_restoring_them_are_hashed(store_path, tmp_path, hash_calls):
    copy = shutil.copytree(store_path, tmp_path / "copy")  # copy2 keeps sizes and mtimes: the inode differs
    LabelStore.open(copy)
    assert sorted(hash_calls) == sorted(f"{name}.npy" for name in json.loads((copy / "meta.json").read_text())["arrays"])
    _flip_byte(store_path / "logits.npy", keep_times=True)  # the ctime still moves
    with pytest.raises(UserError, match="sha256 differs"):
        LabelStore.open(store_path)


def test_verify_ignores_a_stamp_that_stat_cannot_fault(store_path, capsys):
    _flip_byte(store_path / "logits.npy")
    stamp = json.loads((store_path / labels.VERIFIED).read_text())
    stamp["arrays"]["logits"].update(file_state(store_path / "logits.npy"))  # as after bit rot
    (store_path / labels.VERIFIED).write_text(json.dumps(stamp))
    LabelStore.open(store_path)  # the stamp vouches for it: opens stay O(stat)
    parser = argparse.ArgumentParser()
    labels.register(parser.add_subparsers())
    verify = parser.parse_args(["labels", "verify", str(store_path)])
    with pytest.raises(UserError, match="logits.npy: sha256 differs"):
        verify.func(verify)
    _flip_byte(store_path / "logits.npy")  # repaired: verify passes, prints rates, renews the stamp
    (store_path / labels.VERIFIED).unlink()
    verify.func(verify)
    out = capsys.readouterr().out
    names = labels.array_specs(json.loads((store_path / "meta.json").read_text()))
    assert all(f"  {name} " in out for name in names) and out.count("GB/s") == len(names) + 1
    assert f"all {len(names)} arrays match" in out and (store_path / labels.VERIFIED).is_file()


def test_read_only_store_opens_and_warns_that_it_hashes_every_time(store_path, hash_calls, monkeypatch):
    (store_path / labels.VERIFIED).unlink()

    def read_only(path, value):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(stamp, "write_json", read_only)
    with pytest.warns(UserWarning, match="cannot write verified.json"):
        LabelStore.open(store_path)
        hashed_once = len(hash_calls)
        LabelStore.open(store_path)
    assert hashed_once and len(hash_calls) == 2 * hashed_once

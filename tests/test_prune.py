"""Pruning: exact pool sizes and factors, reproducible plans, scored pools against float64 math, smaller stores."""
import argparse

import numpy as np
import pytest
import torch

from lpld import prune
from lpld.errors import UserError
from lpld.codecs import LogitCodec
from lpld.labels import LabelStore


@pytest.mark.parametrize("ratio,factor", [(0.0, 1), (0.9, 10), (0.95, 20), (0.975, 40), (0.99, 100)])
def test_compression_factors_and_pool_sizes_are_exact(ratio, factor):
    assert prune.compression_factor(ratio) == factor
    assert prune.kept_count(300 * 78, ratio) == 300 * 78 // factor
    assert prune.kept_count(100, ratio) == 100 // factor


def test_paper_pool_sizes():
    # SPEC.md section 4: IN-1K IPC10 at 40x keeps int(300 * 78 * 0.025) = 585 records (7 epochs + 39 batches).
    pool = prune.select_pool(np.arange(300 * 78), 78, 0.975)
    assert len(pool) == 585 and pool.tolist() == list(range(585))
    assert prune.compression_factor(0.97) == pytest.approx(33.333333333)
    with pytest.raises(UserError):
        prune.kept_count(10, 0.95)
    with pytest.raises(UserError):
        prune.compression_factor(1.0)


def test_pools_of_each_kind():
    ids = np.arange(40 * 10)  # 40 epochs of 10 batches
    subset = prune.select_pool(ids, 10, 0.9, "subset", seed=1)
    assert len(subset) == 40 and len(set(subset.tolist())) == 40 and subset.max() >= 100
    assert subset.tolist() == prune.select_pool(ids, 10, 0.9, "subset", seed=1).tolist()
    assert subset.tolist() != prune.select_pool(ids, 10, 0.9, "subset", seed=2).tolist()
    epochs = prune.select_pool(ids, 10, 0.9, "epoch")
    assert epochs.tolist() == list(range(40))  # first 4 whole epochs
    assert prune.select_pool(ids, 10, 0.0, "order").tolist() == ids.tolist()
    with pytest.raises(UserError, match="unknown pool"):
        prune.select_pool(ids, 10, 0.9, "loss-easy")
    with pytest.raises(UserError, match="full label store"):
        prune.select_pool(ids, 10, 0.9, "confidence-easy")


def test_plans_are_reproducible_and_differ_across_epochs():
    pool = np.arange(5, 105, 2)
    first = [prune.plan(epoch, 7, pool, 20) for epoch in range(30)]
    assert first == [prune.plan(epoch, 7, pool, 20) for epoch in range(30)]
    assert len({tuple(p) for p in first}) == 30 and all(len(p) == 20 for p in first)
    assert prune.plan(0, 8, pool, 20) != first[0]
    drawn = np.concatenate(first)
    assert set(drawn.tolist()) <= set(pool.tolist())
    assert any(len(set(p)) < len(p) for p in first)  # with replacement: repeats happen (20 of 50, p ~ 0.98 each)
    counts = np.bincount(np.searchsorted(pool, drawn), minlength=len(pool))
    assert counts.min() > 0 and counts.max() < 30  # 600 draws over 50 ids: uniform, about 12 each


def test_order_and_epoch_plans():
    ids = np.arange(6 * 4)
    assert [prune.plan(e, 0, ids, 4, kind="order") for e in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert prune.plan(7, 0, ids, 4, kind="order") == [4, 5, 6, 7]  # wraps around the 6 stored epochs
    chosen = prune.plan(3, 0, ids, 4, kind="epoch")
    assert chosen == list(range(chosen[0], chosen[0] + 4)) and chosen[0] % 4 == 0


@pytest.fixture(scope="module")
def full_store(tmp_path_factory):
    from test_labels import write_store

    path = tmp_path_factory.mktemp("labels") / "full"
    write_store(path, np.arange(12))
    return LabelStore.open(path)


@pytest.mark.parametrize("name", ["confidence", "margin"])
def test_scored_pools_keep_the_easiest_or_hardest(full_store, name):
    logits = torch.from_numpy(np.array(full_store.array("logits"))).double()
    top2 = logits.softmax(-1).topk(2, dim=-1).values
    reference = (top2[..., 0] if name == "confidence" else top2[..., 0] - top2[..., 1]).mean(-1).numpy()
    np.testing.assert_allclose(prune.SCORERS[name](full_store), reference, rtol=1e-5)
    easy = prune.select_pool(full_store.ids, 4, 0.75, f"{name}-easy", store=full_store)
    hard = prune.select_pool(full_store.ids, 4, 0.75, f"{name}-hard", store=full_store)
    ranked = np.argsort(reference)
    assert set(easy.tolist()) == set(ranked[-3:].tolist()) and set(hard.tolist()) == set(ranked[:3].tolist())


def test_unmixed_area_score(full_store):
    box = np.array(full_store.array("mix_box"), dtype=np.float64)
    reference = 1 - (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2]) / 16**2
    np.testing.assert_allclose(prune.SCORERS["unmixed-area"](full_store), reference)


def test_pruned_store_is_smaller_and_holds_the_kept_records(full_store, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    prune.register(parser.add_subparsers())
    args = parser.parse_args(["prune", str(full_store.path), "--ratio", "0.75", "--pool", "subset", "--out", str(tmp_path / "p")])
    args.func(args)
    assert "kept 3 of 12 records (4x" in capsys.readouterr().out
    pruned = LabelStore.open(tmp_path / "p")
    assert pruned.ids.tolist() == prune.select_pool(np.arange(12), 4, 0.75, "subset").tolist()
    assert pruned.meta["prune"] == [{"ratio": 0.75, "pool": "subset", "seed": 0}]
    for g in pruned.ids:
        a, b = pruned.record(g), full_store.record(g)
        for name in ("img_idx", "crop", "flip", "logits", "mix_perm", "mix_box"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    size = lambda store: (store.path / "logits.npy").stat().st_size - 128  # noqa: E731 (npy header)
    assert size(pruned) * 4 == size(full_store)


def test_pruning_re_encodes_and_keeps_the_source_codec_by_default(full_store, tmp_path):
    parser = argparse.ArgumentParser()
    prune.register(parser.add_subparsers())
    run = lambda *flags: parser.parse_args(["prune", *flags]).func(parser.parse_args(["prune", *flags]))  # noqa: E731
    run(str(full_store.path), "--ratio", "0.75", "--topk", "2", "--quant", "fp8", "--out", str(tmp_path / "top2"))
    top2 = LabelStore.open(tmp_path / "top2")
    assert (top2.meta["topk"], top2.meta["quant"]) == (2, "fp8") and len(top2) == 3
    for g in top2.ids:
        a, b = top2.record(g), full_store.record(g)
        for name in ("img_idx", "crop", "flip", "mix_perm", "mix_box"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        full = torch.from_numpy(b.logits).double()
        kept = full.topk(2, dim=-1).indices
        got = torch.from_numpy(a.logits).double()
        assert torch.isfinite(got).sum(-1).eq(2).all() and torch.isfinite(got.gather(-1, kept)).all()
        # the kept values keep their gap (fp8 is relative to the maximum)
        gap = full.gather(-1, kept).diff(dim=-1)
        torch.testing.assert_close(got.gather(-1, kept).diff(dim=-1), gap, atol=0.2 * gap.abs().max().item() + 0.01, rtol=0)
    # pruning a top-2 fp8 store again without codec flags keeps top-2 fp8
    run(str(tmp_path / "top2"), "--ratio", "0.5", "--out", str(tmp_path / "again"))
    again = LabelStore.open(tmp_path / "again")
    assert (again.meta["topk"], again.meta["quant"]) == (2, "fp8")
    np.testing.assert_array_equal(again.array("topk_values"), top2.array("topk_values")[: len(again)])


def test_a_top_k_store_is_never_widened(full_store, tmp_path):
    """Classes a top-k store dropped read back as -inf: re-encoding them (int8 over -inf is NaN)
    is refused, and narrowing keeps finite, ordered values."""
    top2 = LabelStore.open(prune.prune_store(full_store, tmp_path / "top2", 0.5, codec=LogitCodec(2, "fp16")))
    for wider in (LogitCodec(0, "int8"), LogitCodec(3, "int8"), LogitCodec(0, "fp16")):
        with pytest.raises(UserError, match="keeps the top 2 logits"):
            prune.prune_store(top2, tmp_path / f"wide-{wider.name}", 0.5, codec=wider)
    top1 = LabelStore.open(prune.prune_store(top2, tmp_path / "top1", 0.5, codec=LogitCodec(1, "int8")))
    for g in top1.ids:
        got, source = top1.record(g).logits.astype(np.float64), top2.record(g).logits.astype(np.float64)
        assert np.isfinite(got).sum(-1).tolist() == [1] * len(got)
        np.testing.assert_array_equal(got.argmax(-1), source.argmax(-1))
        np.testing.assert_allclose(got.max(-1), source.max(-1), rtol=1e-3)


def test_pruning_waits_for_no_other_rank(full_store, tmp_path, monkeypatch):
    """lpld run prunes on rank 0 alone: a barrier inside prune_store would pair with another stage's on
    the other ranks (and hang the run), so it holds the file lock and nothing more."""
    from lpld import distributed

    def no_barrier():
        raise AssertionError("prune_store waited for other ranks")

    monkeypatch.setattr(distributed, "barrier", no_barrier)
    out = prune.prune_store(full_store, tmp_path / "pruned", 0.5)
    assert LabelStore.open(out).meta["prune"][-1]["ratio"] == 0.5

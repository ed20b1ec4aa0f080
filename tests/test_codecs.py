"""The top-k decodings against LPQLD's definitions, written out here on the full logits: MR (softmax of
the k kept logits at T, zero elsewhere; lpld's top-k from the start), MRS (the other classes at the
sample's smallest logit, then softmax over all K) and MS (the top-k probabilities, the rest spread
evenly over the other classes); stores written and pruned with each, and the codec names."""
import numpy as np
import pytest
import torch

from lpld.codecs import LogitCodec
from lpld.errors import UserError
from lpld.labels import LabelStore
from lpld.prune import prune_store

from test_labels import K, write_store


def _logits(rows=6, classes=K, seed=0):
    return (torch.randn(rows, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3)


def _decoded(codec: LogitCodec, logits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(codec.decode(codec.encode(logits.numpy()), logits.shape[-1]).astype(np.float64))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_mr_is_the_softmax_of_the_kept_logits_zero_elsewhere(temperature):
    z = _logits().half().double()
    top = z.topk(3, dim=1)
    expected = torch.zeros_like(z).scatter(1, top.indices, torch.softmax(top.values / temperature, 1))
    got = torch.softmax(_decoded(LogitCodec(3), z) / temperature, 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_mrs_fills_the_other_classes_with_the_samples_minimum(temperature):
    z = _logits().half().double()
    top = z.topk(3, dim=1)
    filled = z.amin(1, keepdim=True).expand_as(z).clone().scatter(1, top.indices, top.values)
    expected = torch.softmax(filled / temperature, 1)
    got = torch.softmax(_decoded(LogitCodec(3, fill="mrs"), z) / temperature, 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_ms_keeps_the_top_probabilities_and_spreads_the_rest_evenly():
    z = _logits(classes=12)
    p = torch.softmax(z, 1)
    top = p.topk(4, dim=1)
    rest = (1 - top.values.sum(1, keepdim=True)) / (12 - 4)
    expected = rest.expand_as(p).clone().scatter(1, top.indices, top.values)
    got = torch.softmax(_decoded(LogitCodec(4, fill="ms"), z), 1)
    torch.testing.assert_close(got, expected, rtol=5e-3, atol=1e-5)  # fp16 logits and fill: ~0.005 in a logit
    assert torch.allclose(got.sum(1), torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("fill", ["mrs", "ms"])
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_the_fill_lives_in_the_quantized_values_frame(fill, quant):
    """fp8 keeps logits minus the sample maximum: the fill is shifted with them, so the soft labels match
    the fp16 codec's to the quantization's accuracy."""
    z = _logits()
    reference = torch.softmax(_decoded(LogitCodec(3, "fp16", fill), z) / 2, 1)
    got = torch.softmax(_decoded(LogitCodec(3, quant, fill), z) / 2, 1)
    torch.testing.assert_close(got, reference, rtol=0, atol=0.05)


def test_stores_keep_the_fill_and_pruning_re_encodes_it(tmp_path):
    written = write_store(tmp_path / "full", np.arange(4))
    full = LabelStore.open(tmp_path / "full")
    mrs = LabelStore.open(prune_store(full, tmp_path / "mrs", 0.5, codec=LogitCodec(2, fill="mrs")))
    assert mrs.meta["topk_fill"] == "mrs" and "logit_fill" in mrs.specs and LogitCodec.of(mrs.meta).name == "top2mrs-fp16"
    for g in mrs.ids:
        z = torch.from_numpy(written[int(g)].logits).double()
        np.testing.assert_array_equal(mrs.record(int(g)).logits, LogitCodec(2, fill="mrs").decode(
            LogitCodec(2, fill="mrs").encode(z.numpy()), K))
        assert (mrs.record(int(g)).logits.astype(np.float64).min(1) == z.half().double().amin(1).numpy()).all()
    mr = LabelStore.open(prune_store(mrs, tmp_path / "mr", 0.0, codec=LogitCodec(2)))
    assert "topk_fill" not in mr.meta and "logit_fill" not in mr.specs  # re-encoded as MR: the fill is dropped
    kept = LabelStore.open(prune_store(mrs, tmp_path / "kept", 0.0))  # no codec given: the source's, fill included
    assert kept.meta["topk_fill"] == "mrs" and np.array_equal(kept.record(int(kept.ids[0])).logits,
                                                              mrs.record(int(kept.ids[0])).logits)


def test_codec_names_parse_back():
    for name in ("fp16", "int8", "top2-fp16", "top2mrs-fp16", "top3ms-fp8", "top5mr-int8"):
        codec = LogitCodec.parse(name)
        assert LogitCodec.parse(codec.name) == codec
    assert LogitCodec.parse("top5mr-int8").name == "top5-int8" and LogitCodec.parse("top2ms-fp8").fill == "ms"
    for bad in ("top0-fp16", "top2x-fp16", "mrs-fp16", "top-fp8"):
        with pytest.raises(ValueError):
            LogitCodec.parse(bad)
    with pytest.raises(UserError, match="only with --topk"):
        LogitCodec(0, fill="mrs").check(10)


def test_a_top_k_store_keeps_its_decoding(tmp_path):
    """The fill of another decoding needs the classes a top-k store dropped: refused, not faked."""
    write_store(tmp_path / "full", np.arange(4))
    mr = LabelStore.open(prune_store(LabelStore.open(tmp_path / "full"), tmp_path / "mr", 0.0, codec=LogitCodec(3)))
    with pytest.raises(UserError, match="prune the full store instead"):
        prune_store(mr, tmp_path / "mrs", 0.0, codec=LogitCodec(2, fill="mrs"))
    assert LabelStore.open(prune_store(mr, tmp_path / "top2", 0.0, codec=LogitCodec(2))).meta["topk"] == 2

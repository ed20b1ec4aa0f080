"""Class-wise BN statistics against a direct float64 computation (SPEC.md sections 2 and 10.1)."""
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
import safetensors.torch
import torch

from lpld.errors import UserError
from lpld.models import bn_layers, build_model, model_fingerprint, save_teacher
from lpld.recipes import get_recipe
from lpld.stats import MODES, ClassBNStats, _ClassMoments, batches_done, collect_class_bn_stats, stats as stats_command
from lpld.workdir import WorkDir
from test_data import write_fmnist

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 4
# Three batches; class 2 is missing from the second batch and class 3 never appears.
BATCH_LABELS = [[0, 1, 2, 0, 1, 2], [1, 1, 0, 0, 1], [2, 0, 1, 2, 2, 1, 0]]


def tiny_teacher():
    torch.manual_seed(0)
    model = build_model("resnet10", NUM_CLASSES, channels=1, stem="3x3s2")
    for _, bn in bn_layers(model):  # non-trivial running statistics, so BN outputs are not standardised
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return model


def batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(len(labels), 1, 12, 12, generator=generator) * 2 + 0.5, torch.tensor(labels))
            for labels in BATCH_LABELS]


def bn_inputs_float64(model, loader):
    """Per layer, per batch: the BN input as float64, captured by an independent forward hook."""
    captured = {name: [] for name, _ in bn_layers(model)}
    handles = [bn.register_forward_hook(lambda m, args, out, name=name: captured[name].append(args[0].double()))
               for name, bn in bn_layers(model)]
    model.eval()
    with torch.no_grad():
        for images, _ in loader:
            model(images)
    for handle in handles:
        handle.remove()
    return captured


def test_ema_mode_matches_a_per_class_loop_in_float64():
    model, loader = tiny_teacher(), batches()
    reference = bn_inputs_float64(model, loader)
    stats = collect_class_bn_stats(model.train(), loader, NUM_CLASSES, mode="ema", momentum=0.1)
    assert model.training  # mode restored
    assert list(stats.layers) == [name for name, _ in bn_layers(model)] and len(stats.layers) == 12
    for name, inputs in reference.items():
        mean = torch.zeros(NUM_CLASSES, inputs[0].shape[1], dtype=torch.float64)
        var = torch.ones_like(mean)
        for x, (_, labels) in zip(inputs, loader):
            for c in labels.unique().tolist():
                xc = x[labels == c]
                mean[c] = 0.9 * mean[c] + 0.1 * xc.mean(dim=(0, 2, 3))
                var[c] = 0.9 * var[c] + 0.1 * xc.var(dim=(0, 2, 3), unbiased=False)
        layer = stats.layers[name]
        assert layer.mean.dtype == torch.float32 and layer.count.dtype == torch.int64
        torch.testing.assert_close(layer.mean.double(), mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.var.double(), var, atol=1e-5, rtol=1e-4)
        assert layer.count.tolist() == [6, 7, 5, 0]
    assert stats.meta["mode"] == "ema" and stats.meta["teacher_fingerprint"] == model_fingerprint(model)


def test_exact_mode_matches_pooled_moments_in_float64():
    model, loader = tiny_teacher(), batches()
    reference = bn_inputs_float64(model, loader)
    running_before = {name: bn.running_mean.clone() for name, bn in bn_layers(model)}
    stats = collect_class_bn_stats(model, loader, NUM_CLASSES, mode="exact")
    labels = torch.cat([labels for _, labels in loader])
    for name, inputs in reference.items():
        x = torch.cat(inputs)
        for c in range(3):
            torch.testing.assert_close(stats.layers[name].mean[c].double(), x[labels == c].mean(dim=(0, 2, 3)),
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(stats.layers[name].var[c].double(),
                                       x[labels == c].var(dim=(0, 2, 3), unbiased=False), atol=1e-5, rtol=1e-4)
        assert torch.all(stats.layers[name].mean[3] == 0) and torch.all(stats.layers[name].var[3] == 1)
    for name, bn in bn_layers(model):  # global running statistics untouched
        assert torch.equal(bn.running_mean, running_before[name])


@pytest.mark.parametrize("mode", ["ema", "exact"])
def test_a_pass_continued_from_its_checkpoint_equals_one_pass(tmp_path, mode):
    model, loader = tiny_teacher(), batches()
    whole = collect_class_bn_stats(model, loader, NUM_CLASSES, mode=mode)
    checkpoint = tmp_path / "stats-checkpoint.pt"
    collect_class_bn_stats(model, loader[:2], NUM_CLASSES, mode=mode, checkpoint=checkpoint, every=1)
    assert batches_done(checkpoint) == 2
    continued = collect_class_bn_stats(model, loader[2:], NUM_CLASSES, mode=mode, checkpoint=checkpoint, every=1)
    assert continued.meta == whole.meta and continued.meta["images"] == 18
    for name, layer in whole.layers.items():
        assert torch.equal(continued.layers[name].mean, layer.mean) and torch.equal(continued.layers[name].var, layer.var)
    with pytest.raises(UserError, match="other momentum"):
        collect_class_bn_stats(model, loader, NUM_CLASSES, mode=mode, momentum=0.2, checkpoint=checkpoint)


def _two_rank_pass(rank, folder):
    """Rank r folds the r-th half of every batch of ``batches()`` (uneven sizes); rank 0 saves."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        halves = [(images[rank::2], labels[rank::2]) for images, labels in batches()]
        for mode in ("ema", "exact"):
            result = collect_class_bn_stats(tiny_teacher(), halves, NUM_CLASSES, mode=mode, max_batch=4)
            if rank == 0:
                result.save(f"{folder}/{mode}.safetensors")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_over_the_same_batches(tmp_path):
    # ema: the ranks' per-sample moments are gathered and folded as one batch in rank order, so the
    # result equals one process seeing each step's samples of rank 0 then rank 1; exact: sums reduced.
    mp.spawn(_two_rank_pass, args=(str(tmp_path),), nprocs=2)
    in_rank_order = [(torch.cat([images[0::2], images[1::2]]), torch.cat([labels[0::2], labels[1::2]]))
                     for images, labels in batches()]
    for mode in ("ema", "exact"):
        single = collect_class_bn_stats(tiny_teacher(), in_rank_order, NUM_CLASSES, mode=mode)
        ranks = ClassBNStats.load(tmp_path / f"{mode}.safetensors")
        assert ranks.meta["world_size"] == 2 and ranks.meta["images"] == 18
        for name, layer in single.layers.items():
            torch.testing.assert_close(ranks.layers[name].mean, layer.mean, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(ranks.layers[name].var, layer.var, atol=1e-6, rtol=1e-5)
            assert torch.equal(ranks.layers[name].count, layer.count)


@pytest.mark.parametrize("mode", MODES)
def test_padding_rows_of_a_gathered_step_change_nothing(mode):
    """Rows of weight 0 (a rank's padding in the gathered EMA step: label 0 while class 0 is absent,
    any moments) leave every count and class row exactly as the batch without them."""
    layers = bn_layers(tiny_teacher())
    generator = torch.Generator().manual_seed(2)
    labels = torch.tensor([2, 1, 2, 3])
    moments = {name: (torch.randn(6, bn.num_features, generator=generator), torch.rand(6, bn.num_features, generator=generator))
               for name, bn in layers}
    plain, padded = (_ClassMoments(layers, NUM_CLASSES, mode, 0.1, "cpu", {}) for _ in range(2))
    plain.fold(labels, {name: (mean[:4], var[:4]) for name, (mean, var) in moments.items()})
    padded.fold(torch.cat([labels, torch.zeros(2, dtype=torch.int64)]), moments, torch.tensor([1.0, 1, 1, 1, 0, 0]))
    assert plain.count.tolist() == padded.count.tolist() == [0, 1, 2, 1]
    for name in plain.first:
        assert torch.equal(plain.first[name], padded.first[name]) and torch.equal(plain.second[name], padded.second[name])


def test_bad_mode_and_out_of_range_labels_are_user_errors():
    model = tiny_teacher()
    with pytest.raises(UserError, match="mode"):
        collect_class_bn_stats(model, batches(), NUM_CLASSES, mode="pooled")
    with pytest.raises(UserError, match="label"):
        collect_class_bn_stats(model, [(torch.zeros(2, 1, 8, 8), torch.tensor([0, NUM_CLASSES]))], NUM_CLASSES)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_teacher()
    stats = collect_class_bn_stats(model, batches()[:1], NUM_CLASSES, meta={"arch": "resnet10"})
    path = tmp_path_factory.mktemp("stats") / "class_bn_stats.safetensors"
    stats.save(path)
    return model, stats, path


def test_file_round_trip(saved):
    model, stats, path = saved
    loaded = ClassBNStats.load(path, model=model, num_classes=NUM_CLASSES, teacher_fingerprint=model_fingerprint(model))
    assert loaded.meta == stats.meta and list(loaded.layers) == list(stats.layers)
    for name, layer in stats.layers.items():
        for field in ("mean", "var", "count"):
            assert torch.equal(getattr(loaded.layers[name], field), getattr(layer, field))


def test_mismatched_files_are_refused(saved, tmp_path):
    model, _, path = saved
    with pytest.raises(UserError, match="BN layers"):
        ClassBNStats.load(path, model=build_model("resnet18", NUM_CLASSES, channels=1, stem="3x3s2"))
    with pytest.raises(UserError, match="classes"):
        ClassBNStats.load(path, model=model, num_classes=NUM_CLASSES + 1)
    with pytest.raises(UserError, match="teacher"):
        ClassBNStats.load(path, model=model, teacher_fingerprint="0123456789abcdef")
    wide = build_model("resnet10", NUM_CLASSES, channels=1, stem="3x3s2")
    wide.bn1 = torch.nn.BatchNorm2d(32)  # same names, other width
    with pytest.raises(UserError, match="BN layers"):
        ClassBNStats.load(path, model=wide)
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(UserError, match="not an lpld"):
        ClassBNStats.load(other)
    with pytest.raises(UserError, match="lpld stats"):
        ClassBNStats.load(tmp_path / "missing.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError):
        ClassBNStats.load(damaged)


def test_stats_command_writes_a_file_that_fits_its_teacher(tmp_path, capsys):
    write_fmnist(tmp_path / "data", n_train=30, n_val=10)
    recipe = get_recipe("fmnist", [f"data.root={tmp_path / 'data'}", "stats.batch_size=8", "stats.workers=0"])
    workdir = WorkDir(tmp_path / "run")
    teacher = build_model(recipe.model.arch, 10, channels=1, stem=recipe.model.stem).eval()
    save_teacher(workdir.teacher, teacher, recipe)
    result = stats_command(recipe, workdir, "cpu")
    loaded = ClassBNStats.load(workdir.stats, teacher, 10, model_fingerprint(teacher))
    assert loaded.meta == result.meta and loaded.meta["images"] == 30 and loaded.meta["mode"] == "ema"
    assert loaded.meta["arch"] == "resnet10" and loaded.meta["resolution"] == 28 and loaded.meta["dataset_fingerprint"]
    assert loaded.layers["bn1"].count.tolist() == [3] * 10
    assert "12 BN layers" in capsys.readouterr().out
    stats_command(recipe, workdir, "cpu")  # a second call keeps the file
    assert "exists" in capsys.readouterr().out

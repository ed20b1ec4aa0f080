"""Recover: loss pieces and one update against float64 references, batched jobs equal one-class
jobs, ImageFolder output with resume, refusal of bad inputs, and the across-class baseline."""
import argparse
import json
import math
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2 import functional as TF

from lpld import bank, imagefolder, models, recover
from lpld.errors import UserError
from lpld.recipes import get_recipe
from lpld.stats import ClassBNStats, LayerStats
from lpld.workdir import WorkDir

K = 4  # classes


def _recipe(*overrides):
    return get_recipe("fmnist", ["data.num_classes=4", "data.resolution=16", "recover.ipc=3",
                                 "recover.iterations=3", "recover.lr=0.2", *overrides])


def _teacher(recipe, seed=0):
    torch.manual_seed(seed)
    model = models.build_model("resnet10", K, 1, "3x3s2").eval().requires_grad_(False)
    for _, bn in models.bn_layers(model):  # non-trivial running statistics and affine parameters
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.2)
    return model


def _class_stats(teacher, seed=1):
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, bn in models.bn_layers(teacher):
        channels = bn.num_features
        layers[name] = LayerStats(mean=torch.randn(K, channels, generator=generator) * 0.3,
                                  var=torch.rand(K, channels, generator=generator) + 0.5,
                                  count=torch.full((K,), 10, dtype=torch.int64))
    meta = {"arch": "resnet10", "num_classes": K, "mode": "ema", "momentum": 0.1, "resolution": 16,
            "teacher_fingerprint": models.model_fingerprint(teacher), "dataset_fingerprint": "test"}
    return ClassBNStats(layers=layers, meta=meta)


def _synthesizer(recipe, teacher, stats, dtype=torch.float32):
    names = [name for name, _ in models.bn_layers(teacher)]
    targets = recover.Targets.from_class_stats(stats, names, recipe.recover.first_bn_weight, "cpu")
    targets = recover.Targets(targets.mean.to(dtype), targets.var.to(dtype), targets.weights)
    return recover.Synthesizer(teacher.to(dtype), targets, recipe, "cpu")


@pytest.fixture
def workdir(tmp_path):
    recipe = _recipe()
    teacher = _teacher(recipe)
    work = WorkDir(tmp_path / "run")
    models.save_teacher(work.teacher, teacher, recipe)
    _class_stats(teacher).save(work.stats)
    return work


def _reference_loss(teacher, views, groups, labels, means, variances, weights, r_bn, rms):
    """CE mean per group summed + r_bn * sum_l w_l sum_g (||mu_t - mu_g|| + ||var_t - var_g||), float64."""
    model = _double(teacher)
    inputs = []
    handles = [bn.register_forward_hook(lambda m, i, o: inputs.append(i[0])) for _, bn in models.bn_layers(model)]
    logits = model(views.double())
    for handle in handles:
        handle.remove()
    loss = views.new_zeros((), dtype=torch.float64)
    for g in groups.unique():
        members = groups == g
        loss = loss + F.cross_entropy(logits[members], labels[members])
        for x, weight, mean, var in zip(inputs, weights, means, variances):
            xs = x[members].transpose(0, 1).reshape(x.shape[1], -1)
            scale = math.sqrt(x.shape[1]) if rms else 1.0
            term = (torch.linalg.norm(mean[g].double() - xs.mean(1)) +
                    torch.linalg.norm(var[g].double() - xs.var(1, unbiased=False))) / scale
            loss = loss + r_bn * weight * term
    return loss


def _double(teacher):
    copy = models.build_model("resnet10", K, 1, "3x3s2")
    copy.load_state_dict(teacher.state_dict())
    return copy.double().eval().requires_grad_(False)


@pytest.mark.parametrize("bn_loss", ["l2", "rms"])
def test_objective_and_gradient_match_float64_reference(bn_loss):
    recipe = _recipe(f"recover.bn_loss={bn_loss}", "recover.r_bn=0.3")
    teacher = _teacher(recipe)
    stats = _class_stats(teacher)
    names = [name for name, _ in models.bn_layers(teacher)]
    synthesizer = _synthesizer(recipe, teacher, stats)
    generator = torch.Generator().manual_seed(3)
    views = torch.randn(6, 1, 16, 16, generator=generator, requires_grad=True)
    groups = torch.tensor([0, 0, 1, 1, 1, 2])  # uneven groups
    rows = torch.tensor([3, 0, 2])  # their classes
    labels = rows[groups]
    inverse_size = 1.0 / torch.tensor([2.0, 2.0, 3.0, 3.0, 3.0, 1.0])
    loss = synthesizer.objective(views, groups, labels, inverse_size, rows)
    (grad,) = torch.autograd.grad(loss, views)

    reference_views = views.detach().double().requires_grad_(True)
    weights = [10.0] + [1.0] * (len(names) - 1)
    reference = _reference_loss(teacher, reference_views, groups, labels,
                                [stats.layers[n].mean[rows] for n in names],
                                [stats.layers[n].var[rows] for n in names], weights, 0.3, bn_loss == "rms")
    (reference_grad,) = torch.autograd.grad(reference, reference_views)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), reference_grad, rtol=1e-4, atol=1e-7)


def test_a_steps_bn_inputs_die_with_its_graph():
    """The hooks hand the BN inputs to the loss and keep none: once the step's graph is gone, so are
    its activations (a compiled step kept the previous ones alive through the next forward)."""
    recipe = _recipe()
    teacher = _teacher(recipe)
    synthesizer = _synthesizer(recipe, teacher, _class_stats(teacher))
    seen = []
    hook = models.bn_layers(teacher)[0][1].register_forward_pre_hook(lambda _, args: seen.append(weakref.ref(args[0])))
    views = torch.randn(4, 1, 16, 16, requires_grad=True)
    groups, rows = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 2])
    loss = synthesizer.objective(views, groups, rows[groups], torch.full((4,), 0.5), rows)
    torch.autograd.grad(loss, views)
    del loss
    hook.remove()
    assert len(seen) == 1 and seen[0]() is None
    assert synthesizer.bn_matching._inputs == [None] * len(models.bn_layers(teacher))


@pytest.mark.parametrize("pixel_space", ["normalized", "unit"])
def test_two_updates_match_a_direct_computation(pixel_space):
    """Two iterations by hand: randn init from the job's stream, each iteration's crop/flip/roll,
    Adam with betas (0.5, 0.9) and eps 1e-8 written out, lr_t = 0.5 (1 + cos(pi t / T)) lr0 (so the
    second step uses lr0 / 2), clamp to the valid range after every step, back to [0, 1] pixels.
    In "unit" space the images are [0, 1] pixels that the teacher sees normalized (IN-21K,
    SPEC.md section 3)."""
    recipe = _recipe("recover.iterations=2", "recover.jitter=-3,3", f"recover.pixel_space={pixel_space}")
    teacher = _teacher(recipe)
    stats = _class_stats(teacher)
    names = [name for name, _ in models.bn_layers(teacher)]
    job = recover.plan_jobs(recipe)[2]
    result = _synthesizer(recipe, teacher, stats, torch.float64).run([job])

    mean, std, lr0, iterations = 0.2860, 0.3530, 0.2, 2
    low, high = (0.0, 1.0) if pixel_space == "unit" else (-mean / std, (1 - mean) / std)
    generator = torch.Generator().manual_seed(job.seed)
    x = torch.randn(3, 1, 16, 16, generator=generator).double()
    first_moment, second_moment = torch.zeros_like(x), torch.zeros_like(x)
    for t in range(iterations):
        leaf = x.clone().requires_grad_(True)
        (top, left, h, w), = recover.sample_crop_boxes(generator, 1, 16, 16, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
        flip = recover.sample_flips(generator, 1)[0]
        shift = torch.randint(-3, 4, (2,), generator=generator).tolist()
        view = TF.resized_crop(leaf, int(top), int(left), int(h), int(w), [16, 16], antialias=False)
        view = torch.roll(TF.hflip(view) if flip else view, shift, dims=(2, 3))
        if pixel_space == "unit":
            view = (view - mean) / std
        groups = torch.zeros(3, dtype=torch.int64)
        loss = _reference_loss(teacher, view, groups, torch.full((3,), 2), [stats.layers[n].mean[[2]] for n in names],
                               [stats.layers[n].var[[2]] for n in names], [10.0] + [1.0] * (len(names) - 1), 0.05, False)
        (grad,) = torch.autograd.grad(loss, leaf)
        first_moment = 0.5 * first_moment + 0.5 * grad
        second_moment = 0.9 * second_moment + 0.1 * grad * grad
        lr = 0.5 * (1 + math.cos(math.pi * t / iterations)) * lr0
        step = (first_moment / (1 - 0.5 ** (t + 1))) / ((second_moment / (1 - 0.9 ** (t + 1))).sqrt() + 1e-8)
        x = (x - lr * step).clamp(low, high)
    expected = x if pixel_space == "unit" else x * std + mean
    # Adam's second step divides by sqrt(v) of tiny gradients, which magnifies float64 round-off
    # to ~3e-8; other betas or schedules move pixels by 1e-3 or more.
    torch.testing.assert_close(result, expected.clamp(0, 1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_batched_jobs_equal_one_class_at_a_time(dtype, tolerance):
    recipe = _recipe("recover.iterations=4")
    teacher = _teacher(recipe)
    synthesizer = _synthesizer(recipe, teacher, _class_stats(teacher), dtype)
    jobs = recover.plan_jobs(recipe)[:3]
    batched = synthesizer.run(jobs)
    alone = torch.cat([synthesizer.run([job]) for job in jobs])
    assert batched.dtype == dtype and batched.shape == (9, 1, 16, 16)
    torch.testing.assert_close(batched, alone, rtol=0, atol=tolerance)
    assert not torch.equal(alone[:3], alone[3:6])  # the classes really differ


def test_recover_writes_an_imagefolder_and_resumes(workdir, monkeypatch):
    recipe = _recipe("recover.classes_per_step=3")
    root = recover.recover(recipe, workdir, "cpu", show_progress=False)
    images = bank.open(root, 1)
    assert images.classes == ["c00000", "c00001", "c00002", "c00003"]
    assert images.files[:2] == ["c00000/c00000_i0000.jpg", "c00000/c00000_i0001.jpg"]
    assert images.images.shape == (12, 1, 16, 16) and images.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torchvision.io.decode_image(str(root / images.files[0])).shape == (1, 16, 16)  # grayscale JPEG
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["complete"] and sorted(manifest["completed"]) == images.classes
    assert manifest["batching"] == "class-wise" and manifest["seeds"]["recover"] == 0

    # An interrupted run: class 2 lost its manifest entry and one file; a restart redoes only it.
    del manifest["completed"]["c00002"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "c00001" / "c00001_i0002.jpg").unlink()
    before = (root / "c00000" / "c00000_i0000.jpg").stat().st_mtime_ns
    ran = []
    original = recover.Synthesizer.run
    monkeypatch.setattr(recover.Synthesizer, "run", lambda self, jobs: ran.extend(j.key for j in jobs) or original(self, jobs))
    recover.recover(recipe, workdir, "cpu", show_progress=False)
    assert ran == ["c00001", "c00002"]
    assert (root / "c00000" / "c00000_i0000.jpg").stat().st_mtime_ns == before
    assert json.loads((root / "manifest.json").read_text())["complete"]
    assert not list(root.glob("progress-rank*.jsonl"))

    # Other settings on the same tree are refused rather than mixed in.
    with pytest.raises(UserError, match="made with other recover"):
        recover.recover(_recipe("recover.lr=0.3"), workdir, "cpu", show_progress=False)


def _recover_as_rank(rank, root):
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=2)
    try:
        recover.recover(_recipe("recover.image_format=png"), WorkDir(root / "run"), "cpu", show_progress=False)
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_the_classes_and_equal_one_process(workdir, tmp_path):
    """torchrun: each rank takes every other unfinished class, no communication but barriers, and
    rank 0 folds both ranks' records into one manifest; the images equal a one-process run."""
    single = WorkDir(tmp_path / "single")
    single.root.mkdir()
    for name in ("teacher.safetensors", "class_bn_stats.safetensors"):
        (single.root / name).write_bytes((workdir.root / name).read_bytes())
    recover.recover(_recipe("recover.image_format=png"), single, "cpu", show_progress=False)
    mp.spawn(_recover_as_rank, args=(tmp_path,), nprocs=2)
    two = bank.open(workdir.distilled, 1)
    one = bank.open(single.distilled, 1)
    assert two.files == one.files and len(two.files) == 12
    assert (two.images.int() - one.images.int()).abs().max() <= 1  # float sums batched differently, then truncated
    manifest = json.loads((workdir.distilled / "manifest.json").read_text())
    assert manifest["complete"] and manifest["world_size"] == 2
    assert {key: entry["rank"] for key, entry in manifest["completed"].items()} == {
        "c00000": 0, "c00001": 1, "c00002": 0, "c00003": 1}
    assert not list(workdir.distilled.glob("progress-rank*.jsonl"))


def test_refuses_statistics_of_another_teacher(workdir):
    recipe = _recipe()
    _class_stats(_teacher(recipe, seed=7)).save(workdir.stats)
    with pytest.raises(UserError, match="other teacher_fingerprint"):
        recover.recover(recipe, workdir, "cpu", show_progress=False)


def test_refuses_statistics_with_other_layers(workdir):
    recipe = _recipe()
    stats = _class_stats(_teacher(recipe))
    stats.layers.pop(next(iter(stats.layers)))
    stats.save(workdir.stats)
    with pytest.raises(UserError):
        recover.recover(recipe, workdir, "cpu", show_progress=False)


@pytest.mark.parametrize("override,message", [
    ("recover.ipc=0", "at least 1"), ("recover.batching=per-image", "batching"),
    ("recover.bn_loss=l1", "bn_loss"), ("recover.image_format=gif", "image_format"),
    ("recover.jitter=3,-2", "jitter"), ("recover.crop_scale=0,1", "crop_scale")])
def test_bad_settings_are_user_errors(workdir, override, message):
    with pytest.raises(UserError, match=message):
        recover.recover(_recipe(override), workdir, "cpu", show_progress=False)


def test_command_refuses_an_unknown_recipe():
    parser = argparse.ArgumentParser()
    recover.register(parser.add_subparsers())
    args = parser.parse_args(["recover", "--recipe", "imagenet2k"])
    with pytest.raises(UserError, match="unknown recipe"):
        args.func(args)


def test_across_class_uses_the_global_statistics(workdir):
    recipe = _recipe("recover.batching=across-class", "recover.ipc=2")
    jobs = recover.plan_jobs(recipe)
    assert [job.classes for job in jobs] == [(0, 1, 2, 3)] * 2 and [job.indices for job in jobs] == [(0,) * 4, (1,) * 4]
    teacher = models.load_teacher(workdir.teacher, recipe)
    workdir.stats.unlink()  # not needed by the baseline
    targets, stats_fingerprint = recover.load_targets(recipe, workdir, teacher, models.model_fingerprint(teacher), "cpu")
    assert stats_fingerprint is None
    channels = [bn.num_features for _, bn in models.bn_layers(teacher)]
    for (_, bn), mean, var in zip(models.bn_layers(teacher), targets.mean.split(channels, 1), targets.var.split(channels, 1)):
        assert torch.equal(mean, bn.running_mean[None]) and torch.equal(var, bn.running_var[None])

    synthesizer = recover.Synthesizer(teacher, targets, recipe, "cpu")
    views = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    groups, labels, rows = torch.zeros(4, dtype=torch.int64), torch.arange(4), torch.zeros(1, dtype=torch.int64)
    loss = synthesizer.objective(views, groups, labels, torch.full((4,), 0.25), rows)
    layers = models.bn_layers(teacher)
    reference = _reference_loss(teacher, views, groups, labels, [bn.running_mean[None] for _, bn in layers],
                                [bn.running_var[None] for _, bn in layers], [10.0] + [1.0] * (len(layers) - 1),
                                0.05, False)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)

    root = recover.recover(recipe, workdir, "cpu", show_progress=False)
    assert sorted(p.name for p in (root / "c00003").iterdir()) == ["c00003_i0000.jpg", "c00003_i0001.jpg"]
    assert json.loads((root / "manifest.json").read_text())["batching"] == "across-class"


def test_names_sort_in_class_order_beyond_1000_classes():
    names = [imagefolder.class_folder(c, 10450) for c in range(10450)]
    assert names == sorted(names) and names[-1] == "c10449"
    assert imagefolder.image_name(7, 12, 10450, 200, "png") == "c00007_i0012.png"


def test_class_wise_batches_against_global_statistics_for_the_ablation(workdir):
    """Table 4's "+C": the class-wise jobs (one class each, its own seed) matched against the teacher's
    running statistics, a single row; with --stats class every job has its class's row."""
    base, ablation = _recipe(), _recipe("recover.stats=global")
    jobs, global_jobs = recover.plan_jobs(base), recover.plan_jobs(ablation)
    assert [job.stats_row for job in jobs] == list(range(K)) and [job.stats_row for job in global_jobs] == [0] * K
    assert [(j.classes, j.seed) for j in jobs] == [(j.classes, j.seed) for j in global_jobs]
    teacher = models.load_teacher(workdir.teacher, ablation)
    targets, fingerprint = recover.load_targets(ablation, workdir, teacher, models.model_fingerprint(teacher), "cpu")
    layers = models.bn_layers(teacher)
    assert fingerprint is None and targets.mean.shape[0] == 1
    torch.testing.assert_close(targets.mean[0], torch.cat([bn.running_mean for _, bn in layers]))
    parser = argparse.ArgumentParser()
    recover.register(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["recover", "--stats", "mixed"])
    assert parser.parse_args(["recover", "--stats", "global"]).stats == "global"

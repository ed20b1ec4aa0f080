"""What only a CUDA device can show: the DALI GPU replay, Triton inside torch.compile, recover's speed
options, and steady-state steps without host syncs. Every test is ``gpu``-marked and skips cleanly
without CUDA (the kernels' own CUDA tests sit in test_kernel_*.py).
"""
import contextlib
import math

import numpy as np
import pytest
import torch

import test_relabel
import test_stats
from lpld import models, recover, relabel, replay, stats, train
from lpld.labels import LabelStore
from lpld.recipes import get_recipe
from test_recover import _class_stats, _recipe, _teacher
from test_replay import MEAN, PIXEL_TOLERANCE, STD, make_store, plan_of, random_images

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.dali
def test_dali_gpu_replay_equals_the_torch_replay(tmp_path):
    """fn.multi_paste (CutMix), fn.erase (Cutout) and the resize on the GPU against the torch replay."""
    for mix, flip in (("cutmix", "flip"), ("none", "cutout")):
        images = random_images()
        store, _ = make_store(tmp_path / f"labels-{mix}", images, mix=mix, flip=flip, size=12)
        sampler = replay.PlanSampler(plan_of(store))
        dali = replay.DaliLoader(store, images, sampler, 12, MEAN, STD, CUDA)
        dataset = replay.RecordDataset(store, images, 12, MEAN, STD)
        seen = []
        for batch in dali:
            expected = dataset[batch.record]
            assert batch.images.is_cuda
            torch.testing.assert_close(batch.images.cpu(), expected.images, atol=PIXEL_TOLERANCE / min(STD), rtol=0)
            assert torch.equal(batch.logits.cpu(), expected.logits)
            seen.append(batch.record)
        assert seen == sampler.records(0)


def _student_and_batch(seed=0):
    torch.manual_seed(seed)
    model = models.build_model("resnet10", 100, 3, "3x3").to(CUDA).train()
    images = torch.randn(32, 3, 32, 32, device=CUDA)
    teacher_logits = (3 * torch.randn(32, 100, device=CUDA)).half()
    return model, images, teacher_logits


def _loss_and_grads(loss_fn, model, images, teacher_logits):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(images, teacher_logits)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_compiled_training_step_with_the_triton_kl_equals_eager(bf16):
    """The pipeline's loss function (student, fused KL on fp16 stored logits) compiled in one graph
    equals eager: to float reduction order in fp32 (the recipes' default), to bf16 rounding with --bf16."""
    model, images, teacher_logits = _student_and_batch()
    config = get_recipe("imagenet1k", ["train.compile=false", f"train.bf16={bf16}"]).train
    loss_fn = train.make_loss_fn(model, config, CUDA)
    torch._dynamo.reset()
    assert torch._dynamo.explain(loss_fn)(images, teacher_logits).graph_break_count == 0
    eager_loss, eager_grads = _loss_and_grads(loss_fn, model, images, teacher_logits)
    compiled_loss, compiled_grads = _loss_and_grads(torch.compile(loss_fn), model, images, teacher_logits)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=2e-2 if bf16 else 1e-3, atol=1e-6)
    cosines = [torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0)
               for a, b in zip(compiled_grads, eager_grads) if b.abs().max() > 0]
    assert min(cosines) > (0.99 if bf16 else 0.999)


def _synthesizer(options=recover.Options()):
    recipe = _recipe()
    teacher = _teacher(recipe).to(CUDA)
    names = [name for name, _ in models.bn_layers(teacher)]
    targets = recover.Targets.from_class_stats(_class_stats(teacher), names, recipe.recover.first_bn_weight, CUDA)
    return recover.Synthesizer(teacher, targets, recipe, CUDA, options), recipe


def test_recover_with_compile_channels_last_and_bf16_follows_the_fp32_objective():
    """The speed options change the precision, not the objective: the same views give the same loss
    (bf16 rounding) and a gradient pointing the same way; a short run ends in valid pixels."""
    plain, recipe = _synthesizer()
    fast, _ = _synthesizer(recover.Options(compile=True, channels_last=True, bf16=True))
    views = torch.randn(6, 1, 16, 16, device=CUDA)
    groups = torch.tensor([0, 0, 0, 1, 1, 1], device=CUDA)
    labels, rows = torch.tensor([2, 2, 2, 0, 0, 0], device=CUDA), torch.tensor([2, 0], device=CUDA)
    inverse_group_size = torch.full((6,), 1 / 3, device=CUDA)
    results = []
    for synthesizer in (plain, fast):
        x = views.clone().requires_grad_()
        loss = synthesizer.objective(x, groups, labels, inverse_group_size, rows)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss.detach(), grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=3e-2, atol=0)
    assert torch.nn.functional.cosine_similarity(results[1][1].flatten(), results[0][1].flatten(), dim=0) > 0.98
    pixels = fast.run(recover.plan_jobs(recipe)[:2])
    assert pixels.shape == (2 * recipe.recover.ipc, 1, 16, 16) and torch.isfinite(pixels).all()
    assert 0 <= pixels.min() and pixels.max() <= 1


def _syncs_raise() -> None:
    """From here on any host-device sync raises (torch.cuda.set_sync_debug_mode("error"))."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")


def _syncs_allowed() -> None:
    torch.cuda.set_sync_debug_mode("default")


class _SteadyFromSecondBatch:
    """A loader that makes syncs raise from its second batch on (the first step may make plans,
    caches and optimizer state) and allows them again after its last (the pass's closing read-back)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == 1:
                _syncs_raise()
            yield batch
        _syncs_allowed()


@contextlib.contextmanager
def _steady_from_second_forward(module):
    """Syncs raise from ``module``'s second forward to the end of the block; yields the forwards seen."""
    forwards = []

    def count(module, inputs):
        forwards.append(len(inputs[0]))
        if len(forwards) == 2:
            _syncs_raise()

    handle = module.register_forward_pre_hook(count)
    try:
        yield forwards
    finally:
        _syncs_allowed()
        handle.remove()


def test_steady_state_recover_iterations_never_sync():
    """Synthesizer.run's loop (cosine lr, views, teacher, fused BN loss, Adam, clamp) after its first iteration."""
    synthesizer, recipe = _synthesizer()
    with _steady_from_second_forward(synthesizer.teacher) as forwards:
        pixels = synthesizer.run(recover.plan_jobs(recipe)[:2])
    assert len(forwards) == recipe.recover.iterations >= 3
    assert torch.isfinite(pixels).all() and 0 <= pixels.min() and pixels.max() <= 1


@pytest.mark.parametrize("mode", stats.MODES)
def test_steady_state_statistics_pass_never_syncs(mode):
    """collect_class_bn_stats over pinned host batches (what the stats DataLoader yields on CUDA), and
    the same statistics as the CPU pass (to TF32 convolution rounding)."""
    loader = [(images.pin_memory(), labels.pin_memory()) for images, labels in test_stats.batches() * 2]
    try:
        gpu = stats.collect_class_bn_stats(test_stats.tiny_teacher().to(CUDA), _SteadyFromSecondBatch(loader),
                                           test_stats.NUM_CLASSES, mode, device=CUDA)
    finally:
        _syncs_allowed()
    cpu = stats.collect_class_bn_stats(test_stats.tiny_teacher(), test_stats.batches() * 2, test_stats.NUM_CLASSES, mode)
    assert gpu.meta["images"] == cpu.meta["images"] == 36
    for name, layer in cpu.layers.items():
        assert torch.equal(gpu.layers[name].count, layer.count)
        torch.testing.assert_close(gpu.layers[name].mean, layer.mean, atol=1e-3, rtol=1e-2)
        torch.testing.assert_close(gpu.layers[name].var, layer.var, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("flip,mix", [("flip", "cutmix"), ("cutout", "none")])
def test_steady_state_relabel_never_syncs(tmp_path, flip, mix):
    """relabel.generate on CUDA, 2 records per forward: replay in the preparing thread, teacher, logits
    copied to pinned memory and written a forward later; the store equals the CPU one (records
    exactly, logits to TF32 convolution and fp16 rounding)."""
    images = torch.randint(0, 256, (test_relabel.N, 1, 28, 28), generator=torch.Generator().manual_seed(5),
                           dtype=torch.uint8)
    header = relabel.label_header(test_relabel._recipe(flip=flip, mix=mix), images, "data-fp", "teacher-fp")
    teacher = test_relabel._teacher().to(CUDA)
    with _steady_from_second_forward(teacher) as forwards:
        relabel.generate(teacher, images, tmp_path / "gpu", header, device=CUDA, records_per_forward=2)
    assert forwards == [10] * 6
    relabel.generate(test_relabel._teacher(), images, tmp_path / "cpu", header, records_per_forward=2)
    gpu, cpu = LabelStore.open(tmp_path / "gpu"), LabelStore.open(tmp_path / "cpu")
    for g in range(len(cpu)):
        on_gpu, on_cpu = gpu.record(g), cpu.record(g)
        np.testing.assert_array_equal(on_gpu.img_idx, on_cpu.img_idx)
        np.testing.assert_array_equal(on_gpu.crop, on_cpu.crop)
        np.testing.assert_allclose(on_gpu.logits.astype(np.float32), on_cpu.logits.astype(np.float32),
                                   rtol=1e-2, atol=1e-2)


def test_steady_state_training_epoch_never_syncs():
    """train._train_epoch (the compiled loss, AdamW, loss summed on the device) over pinned host
    records, as the torch loader yields them with pin_memory; one read-back at the epoch's end."""
    model, images, teacher_logits = _student_and_batch()
    config = get_recipe("imagenet1k").train
    optimizer = train.build_optimizer(model, config)
    loss_fn = train.make_loss_fn(model, config, CUDA)
    record = replay.ReplayBatch(images.cpu().pin_memory(), teacher_logits.cpu().pin_memory(), 0)
    start = [p.detach().clone() for p in model.parameters()]
    try:
        loss, steps = train._train_epoch(_SteadyFromSecondBatch([record] * 4), loss_fn, optimizer, 0,
                                         contextlib.nullcontext, CUDA, torch.channels_last, lambda: None, None)
    finally:
        _syncs_allowed()
    assert steps == 4 and math.isfinite(loss) and loss > 0
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), start))

"""What only a CUDA device can show: the DALI GPU replay, Triton inside torch.compile, recover's speed
options, and steady-state steps without host syncs. Every test is ``gpu``-marked and skips cleanly
without CUDA (the kernels' own CUDA tests sit in test_kernel_*.py).
"""
import pytest
import torch

from lpld import models, recover, replay, train
from lpld.recipes import get_recipe
from test_recover import _class_stats, _recipe, _teacher
from test_replay import MEAN, PIXEL_TOLERANCE, STD, make_store, plan_of, random_images

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


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


def test_steady_state_recover_and_training_steps_never_sync():
    """After a first step (launch plans, device tables), recover's and training's steps run under
    torch.cuda.set_sync_debug_mode("error"): any host-device sync raises."""
    synthesizer, recipe = _synthesizer()
    jobs = recover.plan_jobs(recipe)[:2]
    generators = [torch.Generator().manual_seed(job.seed) for job in jobs]
    sizes = [len(job) for job in jobs]
    images = torch.randn(sum(sizes), 1, 16, 16, device=CUDA).requires_grad_()
    groups = torch.repeat_interleave(torch.arange(len(jobs)), torch.tensor(sizes)).to(CUDA)
    labels = torch.tensor([c for job in jobs for c in job.classes], device=CUDA)
    inverse_group_size = torch.full((sum(sizes),), 1 / sizes[0], device=CUDA)
    rows = torch.tensor([job.stats_row for job in jobs], device=CUDA)
    optimizer = torch.optim.Adam([images], lr=0.1, betas=(0.5, 0.9))

    def recover_step():
        loss = synthesizer.objective(synthesizer._views(images, generators, sizes), groups, labels,
                                     inverse_group_size, rows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            images.clamp_(synthesizer.low, synthesizer.high)

    model, batch, teacher_logits = _student_and_batch()
    train_optimizer = train.build_optimizer(model, get_recipe("imagenet1k").train)
    loss_fn = train.make_loss_fn(model, get_recipe("imagenet1k").train, CUDA)

    def train_step():
        train_optimizer.zero_grad(set_to_none=True)
        loss_fn(batch, teacher_logits).backward()
        train_optimizer.step()

    start = images.detach().clone()
    for step in (recover_step, train_step):
        step()  # first step: plans, caches and the optimizer state are made here
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert not torch.equal(images.detach(), start) and torch.isfinite(images).all()

"""Fused kernels vs the eager and the torch.compile'd reference: forward + backward time.

Shapes (SPEC.md sections 3 and 6):
- BN matching: the inputs of torchvision ResNet-18's 20 BN layers for a recover batch of 50
  images at 224 px (ImageNet-1K), 64 px and 32 px, 5 classes x 10 images per batch matched against
  those 5 classes' statistics, first layer weighted 10 as in recover; one step = the weighted
  sum of the 20 losses and dL/dx for all 20.
- Soft-label KL: a training batch N=128 x K=1000 (ImageNet-1K) and N=32 x K=10450
  (ImageNet-21K-P); student float32 logits, teacher float16 (as the label store holds them), T=20.

Providers: "eager" (the definition in torch autograd; for BN a loop over the layers),
"compiled" (torch.compile of the same reference; its compile time falls in the warm-up round,
untimed), "triton" (the fused op, for BN all 20 layers in one call; CUDA only: the interpreter on
CPU is a correctness tool). Each row holds the median step time, images/sec
(rows/sec for KL), the effective GB/s over the bytes a fused step must move (BN: read x twice,
write dx; KL: read both logits, write the gradient) and the speed-up over eager from the same
run. On CUDA it adds the time over the bandwidth floor (those bytes at the measured device-copy
bandwidth) and the peak memory one step allocates next to the gradient it returns.
"""
import functools

import pytest
import torch
import torchvision
import triton.testing

import lpld_kernels
from lpld_kernels import bn_match
from lpld_kernels.kl_div import soft_kl_div_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROUNDS = 5  # CPU rounds (CUDA timing is do_bench's)
PROVIDERS = ["eager", "compiled", "triton"]
BATCH = 50
GROUPS = 5
TEMPERATURE = 20.0
ROWS: list[dict] = []


@functools.cache
def loss_function(op: str, provider: str):
    """One callable per (op, provider), so torch.compile's cache is shared across shapes.

    "eager" is the definition in plain torch autograd (for BN, a loop over layers), "compiled" the
    same under torch.compile, "triton" the fused op (for BN, all layers in one call)."""
    if provider == "triton" and not CUDA:
        pytest.skip("the fused kernels are timed on CUDA only")
    reference = {"bn": bn_match.class_bn_loss_reference, "kl": soft_kl_div_reference}
    if provider == "compiled":
        return torch.compile(reference[op])
    if provider == "eager":
        return reference[op]
    return {"bn": functools.partial(lpld_kernels.class_bn_loss_layers, backend="triton"),
            "kl": functools.partial(lpld_kernels.soft_kl_div, backend="triton")}[op]


def bn_input_shapes(resolution: int) -> list[tuple[int, ...]]:
    """The input shape of each of ResNet-18's 20 BN layers for a batch of BATCH images."""
    model = torchvision.models.resnet18().eval()
    shapes = []
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda _, inputs, __: shapes.append((BATCH, *inputs[0].shape[1:])))
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    return shapes


@functools.cache
def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy: the floor any memory-bound kernel can reach."""
    source = torch.empty(2**28, dtype=torch.float32, device=DEVICE)
    target = torch.empty_like(source)
    target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * source.nbytes / (start.elapsed_time(end) / 1000)


def peak_extra_bytes(step) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(benchmark, case, provider, step, items, unit, moved_bytes, gradient_bytes):
    """Time ``step`` and keep a row. On CUDA ``triton.testing.do_bench``: the median over ~100 ms of
    calls, each between CUDA events and with the L2 cache flushed before it, no host sync per call
    (a KL step is microseconds: one synchronize per call would time the launch overhead). On the
    CPU, pytest-benchmark: the median of ROUNDS after one warm-up."""
    if CUDA:
        seconds = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median") / 1000
    else:
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
        seconds = benchmark.stats.stats.median
    row = {"case": case, "provider": provider, "seconds": seconds, f"{unit}_per_sec": items / seconds,
           "effective_GBps": moved_bytes / seconds / 1e9, "gradient_bytes": gradient_bytes}
    if CUDA:
        row["bandwidth_floor_ratio"] = seconds / (moved_bytes / copy_bandwidth())
        row["peak_extra_bytes"] = peak_extra_bytes(step)
    ROWS.append(row)
    return row


@pytest.fixture(scope="module", autouse=True)
def kernels_results(write_benchmark_results):
    """Collect the rows, write them at the end; on CPU run single-threaded (see ``notes``)."""
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    eager = {row["case"]: row["seconds"] for row in ROWS if row["provider"] == "eager"}
    for row in ROWS:
        if row["case"] in eager:
            row["speedup_vs_eager"] = eager[row["case"]] / row["seconds"]
    notes = (
        ("CUDA: triton.testing.do_bench median (25 ms warm-up, 100 ms of calls, L2 flushed before each); " if CUDA else
         f"median of {ROUNDS} rounds after 1 warm-up; ") + "compile time excluded; float32 NCHW BN inputs; "
        + ("" if CUDA else "CPU: one torch thread, because with two every op waits on the sibling core "
           "whenever the 2-core machine runs anything else (128x1000 log_softmax 20 ms instead of 0.4 ms); "
           "triton rows skipped, the interpreter is not a performance path; the GPU targets need a GPU run")
    )
    write_benchmark_results("kernels", ROWS, notes)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("resolution", [224, 64, 32])
def test_class_bn_loss_forward_backward(benchmark, provider, resolution):
    loss_fn = loss_function("bn", provider)
    generator = torch.Generator().manual_seed(0)
    shapes = bn_input_shapes(resolution)
    inputs = [torch.randn(shape, generator=generator).to(DEVICE).requires_grad_() for shape in shapes]
    channels = sum(shape[1] for shape in shapes)
    mean, var = torch.randn(GROUPS, channels, device=DEVICE), torch.rand(GROUPS, channels, device=DEVICE) + 0.5
    weights = [10.0] + [1.0] * (len(shapes) - 1)
    groups = torch.arange(GROUPS, device=DEVICE).repeat_interleave(BATCH // GROUPS)

    def step():
        torch.autograd.grad(loss_fn(inputs, groups, mean, var, weights), inputs)

    input_bytes = sum(x.nbytes for x in inputs)
    row = measure(benchmark, f"bn-resnet18-{resolution}px-b{BATCH}", provider, step, BATCH, "images",
                  3 * input_bytes, input_bytes)
    reference = bn_match.class_bn_loss_reference([x.double() for x in inputs], groups, mean.double(), var.double(),
                                                 weights)
    torch.testing.assert_close(loss_fn(inputs, groups, mean, var, weights).double(), reference, rtol=1e-4, atol=0)
    assert row["seconds"] > 0


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("rows, classes", [(128, 1000), (32, 10450)])
def test_soft_kl_div_forward_backward(benchmark, provider, rows, classes):
    loss_fn = loss_function("kl", provider)
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(rows, classes, generator=generator)).to(DEVICE).requires_grad_()
    teacher = (3 * torch.randn(rows, classes, generator=generator)).to(DEVICE, torch.float16)

    def step():
        torch.autograd.grad(loss_fn(student, teacher, TEMPERATURE), student)

    row = measure(benchmark, f"kl-n{rows}-k{classes}", provider, step, rows, "rows",
                  student.nbytes + teacher.nbytes + student.nbytes, student.nbytes)
    reference = soft_kl_div_reference(student.double(), teacher.double(), TEMPERATURE)
    torch.testing.assert_close(loss_fn(student, teacher, TEMPERATURE).double(), reference, rtol=1e-4, atol=1e-7)
    assert row["seconds"] > 0

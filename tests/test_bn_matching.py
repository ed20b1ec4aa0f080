"""BNStatisticsMatching against the loop it replaces: one plain forward hook per BatchNorm2d, as SRe2L's
``BNFeatureHook`` (running statistics) and LPLD's class-wise variant compute it, written out here.
Equal loss and input gradient in float64 (the op's torch backend) for a torchvision ResNet-18 and a
model whose BN layers see different resolutions; the Triton path under the interpreter in float32.
"""
import pytest
import torch
import torchvision
from torch import nn

from lpld_kernels import BNStatisticsMatching

NUM_CLASSES = 5


class FeatureHook:
    """SRe2L's per-layer hook: r_feature = ||var - target_var||_2 + ||mean - target_mean||_2 of the
    layer's input over (N, H, W); with class tables, summed over the classes present in the batch."""

    def __init__(self, module, class_mean=None, class_var=None):
        self.module, self.class_mean, self.class_var = module, class_mean, class_var
        self.classes = None
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, inputs, output):
        x = inputs[0]
        if self.class_mean is None:
            self.r_feature = self._distance(x, module.running_mean, module.running_var)
            return
        self.r_feature = sum(self._distance(x[self.classes == c], self.class_mean[c], self.class_var[c])
                             for c in torch.unique(self.classes).tolist())

    @staticmethod
    def _distance(x, mean, var):
        channels = x.shape[1]
        flat = x.permute(1, 0, 2, 3).reshape(channels, -1)
        return torch.norm(var - flat.var(1, unbiased=False), 2) + torch.norm(mean - flat.mean(1), 2)

    def close(self):
        self.hook.remove()


class TwoResolutions(nn.Module):
    """BN layers at 16, 8 and 32 px (an upsampling branch) and a BN over 1x1 features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.up = nn.Sequential(nn.Upsample(scale_factor=4), nn.Conv2d(12, 6, 1), nn.BatchNorm2d(6))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(12, 10, 1), nn.BatchNorm2d(10), nn.Flatten(),
                                  nn.Linear(10, NUM_CLASSES))

    def forward(self, x):
        features = self.down(self.stem(x))
        return self.head(features) + self.up(features).mean((1, 2, 3))[:, None]


def _model(kind, dtype):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES) if kind == "resnet18" else TwoResolutions()
    model.train()  # running statistics that are not the defaults 0 / 1
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32) * 2 + 0.3)
    return model.eval().to(dtype).requires_grad_(False)


def _class_tables(model, dtype):
    generator = torch.Generator().manual_seed(4)
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    means = [torch.randn(NUM_CLASSES, bn.num_features, generator=generator, dtype=dtype) for bn in layers]
    variances = [torch.rand(NUM_CLASSES, bn.num_features, generator=generator, dtype=dtype) + 0.5 for bn in layers]
    return means, variances


def _hook_loop(model, images, classes, first_bn_multiplier, tables=None):
    """The SRe2L-style loop: hooks, forward, the weighted sum of r_feature; returns (loss, d loss / d images)."""
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [FeatureHook(bn, *(None, None) if tables is None else (tables[0][i], tables[1][i]))
             for i, bn in enumerate(layers)]
    for hook in hooks:
        hook.classes = classes
    images = images.detach().requires_grad_()
    model(images)
    rescale = [first_bn_multiplier] + [1.0] * (len(hooks) - 1)
    loss = sum(hook.r_feature * rescale[i] for i, hook in enumerate(hooks))
    for hook in hooks:
        hook.close()
    return loss, torch.autograd.grad(loss, images)[0]


def _drop_in(model, images, classes, first_bn_multiplier, tables=None, backend="torch"):
    matching = BNStatisticsMatching(model, *(tables or (None, None)), first_bn_multiplier=first_bn_multiplier,
                                    backend=backend)
    images = images.detach().requires_grad_()
    model(images)
    loss = matching() if tables is None else matching(classes)
    matching.remove()
    return loss, torch.autograd.grad(loss, images)[0]


@pytest.mark.parametrize("kind", ["resnet18", "two-resolutions"])
@pytest.mark.parametrize("targets", ["running", "class-wise"])
def test_equals_the_hook_loop_in_float64(kind, targets):
    model = _model(kind, torch.float64)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    classes = torch.tensor([3, 0, 3, 1, 0, 3])
    tables = _class_tables(model, torch.float64) if targets == "class-wise" else None
    loss, grad = _drop_in(model, images, classes, 10.0, tables)
    expected_loss, expected_grad = _hook_loop(model, images, classes, 10.0, tables)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12 * expected_grad.abs().max().item())


@pytest.mark.parametrize("kind", ["resnet18", "two-resolutions"])
@pytest.mark.parametrize("targets", ["running", "class-wise"])
def test_triton_path_equals_the_float64_hook_loop(kind, targets):
    """The fused kernels (interpreted on the CPU) in float32 against the float64 loop."""
    model = _model(kind, torch.float32)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([2, 2, 4, 2])
    tables = _class_tables(model, torch.float32) if targets == "class-wise" else None
    loss, grad = _drop_in(model, images, classes, 10.0, tables, backend="triton")
    double = _model(kind, torch.float64)
    expected_loss, expected_grad = _hook_loop(double, images.double(), classes, 10.0,
                                              None if tables is None else [[t.double() for t in ts] for ts in tables])
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-3, atol=1e-3 * expected_grad.abs().max().item())


def test_one_table_groups_and_rows_and_weights_reach_the_loss():
    """One [K, sum C] table equals the per-layer list; groups + rows equal classes; per-layer weights
    and the first-layer multiplier are the same thing; rms divides each layer by sqrt(C)."""
    model = _model("two-resolutions", torch.float64)
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    means, variances = _class_tables(model, torch.float64)
    classes = torch.tensor([4, 1, 1, 4, 4])
    per_layer = BNStatisticsMatching(model, means, variances, first_bn_multiplier=3.0)
    model(images)
    expected = per_layer(classes)
    one_table = BNStatisticsMatching(model, torch.cat(means, 1), torch.cat(variances, 1), weights=[3.0, 1.0, 1.0, 1.0])
    model(images)
    assert torch.equal(one_table(groups=torch.tensor([1, 0, 0, 1, 1]), rows=torch.tensor([1, 4])), expected)
    unweighted = BNStatisticsMatching(model, means, variances)
    model(images)
    assert not torch.equal(unweighted(classes), expected)
    rms = BNStatisticsMatching(model, means, variances, weights=[3.0 / 8**0.5, 1 / 12**0.5, 1 / 6**0.5, 1 / 10**0.5])
    rms_flag = BNStatisticsMatching(model, means, variances, first_bn_multiplier=3.0, rms=True)
    model(images)
    torch.testing.assert_close(rms(classes), rms_flag(classes), rtol=1e-12, atol=0)


def test_remove_detaches_and_misuse_is_explained():
    model = _model("two-resolutions", torch.float32)
    matching = BNStatisticsMatching(model)
    with pytest.raises(RuntimeError, match="run the model forward"):
        matching()
    model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="class-wise mean and var"):
        matching(torch.tensor([0, 1]))
    assert torch.isfinite(matching())
    with pytest.raises(RuntimeError, match="run the model forward"):
        matching()  # the inputs were released with the first loss
    matching.remove()
    model(torch.randn(2, 3, 32, 32))
    with pytest.raises(RuntimeError, match="run the model forward"):
        matching()
    with pytest.raises(ValueError, match=r"\[K, C_l\] per BatchNorm2d layer"):
        BNStatisticsMatching(model, torch.zeros(3, 7), torch.zeros(3, 7))
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        BNStatisticsMatching(nn.Linear(2, 2))


def test_running_statistics_are_read_when_they_change():
    """SRe2L's hook reads running_mean/var at each forward: so does the drop-in (it rebuilds its
    tables only when a layer's statistics tensor was written)."""
    model = _model("two-resolutions", torch.float64)
    matching = BNStatisticsMatching(model)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    model(images)
    before = matching()
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).running_mean.add_(1.0)
    model(images)
    after = matching()
    torch.testing.assert_close(after, _hook_loop(model, images, None, 1.0)[0], rtol=1e-12, atol=0)
    assert after != before

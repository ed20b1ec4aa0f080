"""``BNStatisticsMatching``: the hook-level drop-in for the BN-matching loss of SRe2L, CDA and LPLD loops.

Those codebases register one forward hook per ``BatchNorm2d`` (SRe2L's ``BNFeatureHook``): each
keeps ||mean - running_mean||_2 + ||var - running_var||_2 of its layer's input over the batch and
H, W, and the loop sums them with the first layer weighted by ``first_bn_multiplier``; LPLD's
variant matches each class's samples against that class's statistics. This module hooks every
``BatchNorm2d`` of a model and, after a forward, returns that whole sum from one fused call
(``class_bn_loss_layers``: four Triton launches on a GPU, whatever the number of layers):

    bn_matching = BNStatisticsMatching(model, first_bn_multiplier=10.0)  # was: [BNFeatureHook(m) for ...]
    outputs = model(inputs)
    loss = criterion(outputs, targets) + r_bn * bn_matching()            # was: sum(h.r_feature * rescale[i] ...)
    bn_matching.remove()                                                 # was: h.close() for each hook

With class-wise target tables (``mean`` / ``var``: [K, C_l] per layer, or one [K, sum C_l] table
with the layers side by side in module order), ``bn_matching(classes)`` matches the samples of each
class in the batch against that class's row (LPLD), and ``bn_matching(groups=..., rows=...)`` takes
the grouping ready-made (what recover passes: no host sync).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .bn_match import class_bn_loss_layers


def _accumulated(statistic: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for a float64 model (the precision the op accumulates in)."""
    return statistic.detach().to(torch.promote_types(statistic.dtype, torch.float32))


class BNStatisticsMatching(nn.Module):
    """Sum over BN layers l of w_l * (||mu_l - target_mean_l|| + ||var_l - target_var_l||) of their inputs.

    ``mean`` / ``var`` None: the targets are the model's own running statistics (SRe2L / CDA,
    across-class), read as they are at each call. ``weights`` (one per layer) or
    ``first_bn_multiplier`` (the first layer's, the others 1); ``rms`` divides each layer's norms
    by sqrt(C_l); ``backend`` as in ``class_bn_loss_layers`` (None: Triton on CUDA tensors).
    """

    def __init__(self, model: nn.Module, mean: torch.Tensor | Sequence[torch.Tensor] | None = None,
                 var: torch.Tensor | Sequence[torch.Tensor] | None = None, *, first_bn_multiplier: float = 1.0,
                 weights: Sequence[float] | None = None, rms: bool = False, backend: str | None = None):
        super().__init__()
        layers = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
        if not layers:
            raise ValueError("the model has no BatchNorm2d layer to match")
        if weights is not None and len(weights) != len(layers):
            raise ValueError(f"expected one weight per BatchNorm2d layer ({len(layers)}), got {len(weights)}")
        if (mean is None) != (var is None):
            raise ValueError("give both mean and var (class-wise targets), or neither (the running statistics)")
        self.weights = [float(w) for w in weights] if weights is not None else \
            [float(first_bn_multiplier)] + [1.0] * (len(layers) - 1)
        self.rms, self.backend = rms, backend
        self._layers = layers  # a plain list: the model's modules are not this module's children
        self._channels = [layer.num_features for layer in layers]
        self.class_wise = mean is not None
        if self.class_wise:
            self.register_buffer("target_mean", self._table(mean, "mean"), persistent=False)
            self.register_buffer("target_var", self._table(var, "var"), persistent=False)
        self._running: tuple | None = None  # (versions, mean table, var table) of the running statistics
        self._inputs: list[torch.Tensor | None] = [None] * len(layers)
        self._handles = [layer.register_forward_hook(self._keeper(i)) for i, layer in enumerate(layers)]

    def _table(self, value, name: str) -> torch.Tensor:
        table = torch.cat(list(value), dim=1) if not isinstance(value, torch.Tensor) else value
        if table.dim() != 2 or table.shape[1] != sum(self._channels):
            raise ValueError(f"{name}: expected [K, C_l] per BatchNorm2d layer or one [K, {sum(self._channels)}] "
                             f"table (the layers' channels side by side), got {tuple(table.shape)}")
        return table.detach()

    def _keeper(self, i: int):
        def keep(module, inputs, output):
            self._inputs[i] = inputs[0]
        return keep

    def _running_targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The running statistics as one-row tables, rebuilt only when a BN layer has updated them."""
        versions = tuple((layer.running_mean._version, layer.running_var._version) for layer in self._layers)
        if self._running is None or self._running[0] != versions:
            mean = torch.cat([_accumulated(layer.running_mean) for layer in self._layers])[None]
            var = torch.cat([_accumulated(layer.running_var) for layer in self._layers])[None]
            self._running = (versions, mean, var)
        return self._running[1], self._running[2]

    def forward(self, classes: torch.Tensor | None = None, *, groups: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of the latest forward of the model (its BN inputs are then released).

        Running statistics: no argument. Class-wise tables: ``classes`` [B] (each sample's class;
        finding the classes present reads them back to the host once), or ``groups`` [B] in [0, G)
        with ``rows`` [G], each group's row of the tables.
        """
        if not self.class_wise and (classes is not None or groups is not None or rows is not None):
            raise ValueError("the running statistics are one target for the whole batch: to match classes, "
                             "build BNStatisticsMatching with class-wise mean and var tables")
        if self.class_wise and (classes is None) == (groups is None or rows is None):
            raise ValueError("class-wise matching needs each sample's class: bn_matching(classes), or "
                             "bn_matching(groups=..., rows=...), not both")
        if any(x is None for x in self._inputs):
            raise RuntimeError("BNStatisticsMatching: run the model forward before asking for the loss "
                               "(once per loss; the hooks keep only the latest forward's inputs)")
        inputs, self._inputs = self._inputs, [None] * len(self._inputs)
        if len({x.dtype for x in inputs}) > 1:  # e.g. a BN fed by an op autocast keeps in float32
            inputs = [x.float() for x in inputs]
        if not self.class_wise:
            mean, var = self._running_targets()
            groups = torch.zeros(inputs[0].shape[0], dtype=torch.int64, device=inputs[0].device)
        else:
            mean, var = self.target_mean, self.target_var
            if classes is not None:
                rows, groups = torch.unique(classes, return_inverse=True)
        return class_bn_loss_layers(inputs, groups, mean, var, self.weights, rows, rms=self.rms, backend=self.backend)

    def remove(self) -> None:
        """Detach the hooks from the model (SRe2L's ``hook.close()`` for every layer)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._inputs = [], [None] * len(self._layers)

    def extra_repr(self) -> str:
        targets = f"class-wise {tuple(self.target_mean.shape)}" if self.class_wise else "running statistics"
        return f"layers={len(self._layers)}, targets={targets}, weights[0]={self.weights[0]}, rms={self.rms}"

"""lpld_kernels: fused Triton losses for dataset distillation, each with a PyTorch reference.

``class_bn_loss`` (one BN layer) / ``class_bn_loss_layers`` (every BN layer of a step in four launches):
class-wise BatchNorm statistic matching (LPLD recover, SPEC.md section 3).
``BNStatisticsMatching``: the same loss as a module that hooks every BatchNorm2d of a model, the
drop-in for the per-layer BN hooks of SRe2L / CDA / LPLD synthesis loops.
``soft_kl_div`` / ``SoftKLDivLoss``: temperature soft-label KL (FKD-style training, section 6).
"""
from .bn_match import class_bn_loss, class_bn_loss_layers
from .bn_matching import BNStatisticsMatching
from .kl_div import SoftKLDivLoss, soft_kl_div

__all__ = ["class_bn_loss", "class_bn_loss_layers", "BNStatisticsMatching", "soft_kl_div", "SoftKLDivLoss"]

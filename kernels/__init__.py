"""lpld_kernels: fused Triton losses for dataset distillation, each with a PyTorch reference.

``class_bn_loss``: class-wise BatchNorm statistic matching (LPLD recover, SPEC.md section 3).
``soft_kl_div`` / ``SoftKLDivLoss``: temperature soft-label KL (FKD-style training, section 6).
"""
from .bn_match import class_bn_loss
from .kl_div import SoftKLDivLoss, soft_kl_div

__all__ = ["class_bn_loss", "soft_kl_div", "SoftKLDivLoss"]

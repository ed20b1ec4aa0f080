"""lpld: soft-label pruning for large-scale dataset distillation (Xiao & He, NeurIPS'24).

Stages, one module each: ``squeeze`` (teacher), ``stats`` (class-wise BN statistics),
``recover`` (class-wise image synthesis), ``relabel`` (FKD soft labels into a ``labels`` store),
``prune`` (label pools and training plans), ``replay`` + ``train`` (student), ``evaluate``.
"""
__version__ = "0.1.0"

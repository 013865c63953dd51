"""Adversarial and corruption robustness: PGD in pixel space, common corruptions per domain, and
the ``robustness`` evaluation task. The adversarial fine-tuning methods ``fare`` and ``tecoa``
live with the other methods (``core/methods/adversarial.py``) and use :func:`pgd_linf`.
"""
from .attack import pgd_linf
from .config import RobustnessConfig, eps_label
from .corruptions import (CORRUPTION_SETS, CORRUPTIONS, corrupt, corruption_set, register_corruption,
                          register_corruption_set)
from .evaluate import condition_names, robust_retrieval, robust_zeroshot
from .pixels import PixelSpace

__all__ = ["CORRUPTIONS", "CORRUPTION_SETS", "PixelSpace", "RobustnessConfig", "condition_names", "corrupt",
           "corruption_set", "eps_label", "pgd_linf", "register_corruption", "register_corruption_set",
           "robust_retrieval", "robust_zeroshot"]

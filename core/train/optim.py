"""AdamW and the cosine schedule with linear warm-up."""
from __future__ import annotations

import math
from typing import Any

import torch

from .speed import adamw_kwargs


def build_optimizer(param_groups: list[dict[str, Any]], train_cfg: Any) -> torch.optim.Optimizer:
    """AdamW over ``param_groups`` (fused kernel where torch has one for every parameter)."""
    for group in param_groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.AdamW(param_groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas), eps=train_cfg.eps,
                             **adamw_kwargs(param_groups))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to each group's lr, then cosine decay to ``lr * min_lr_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

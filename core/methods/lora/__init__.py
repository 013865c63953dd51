"""LoRA / DoRA through peft on the attention and MLP layers of either or both towers.

``method: {name: lora, towers: [image, text], targets: [attention, mlp], rank: 8, alpha: 16}``.
Each backbone family maps ``targets`` to module names (``Backbone.lora_preset``, see :mod:`.presets`); open_clip's
``nn.MultiheadAttention`` is split into separate q/k/v/out Linear layers first (see
:mod:`.attention`). :func:`merged_backbone` folds the adapters into the weights (``domainclip merge``: :mod:`domainclip.core.export.merge`).
"""
from .attention import SeparateProjectionAttention, join_attention, split_attention
from .config import LoraConfig
from .method import (Lora, adapted_layer_names, is_adapter_parameter, merged_backbone, save_merged)
from .presets import TargetPlan, plan_targets, tower_preset

__all__ = ["Lora", "LoraConfig", "SeparateProjectionAttention", "TargetPlan",
           "adapted_layer_names", "is_adapter_parameter", "join_attention", "merged_backbone",
           "plan_targets", "save_merged", "split_attention", "tower_preset"]

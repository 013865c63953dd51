"""Which Linear layers get adapters: the backbone family's preset per tower, restricted to the chosen towers.

A preset (:class:`~domainclip.core.backbones.base.TowerPreset`) names module paths inside one
transformer block; each family returns its own from ``Backbone.lora_preset(tower)`` (a dual
encoder answers for its timm or open_clip vision tower and its BERT-like text tower), and the
preset is checked against the tower's first block before any adapter is placed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ...backbones.base import Backbone, TowerPreset, tower_blocks
from .attention import SeparateProjectionAttention, join_attention, split_attention
from .config import LoraConfig


@dataclass
class TargetPlan:
    """The outcome of target resolution.

    Attributes:
        modules: full names of the Linear layers that get adapters, in model order.
        split: attention modules that were split into separate projections.
        families: the preset family used for each tower (``custom`` with ``target_modules``).
    """

    modules: list[str]
    split: list[str] = field(default_factory=list)
    families: dict[str, str] = field(default_factory=dict)


def preset_fits(preset: TowerPreset, block: nn.Module) -> bool:
    """Whether every layer ``preset`` names exists in ``block`` with the expected type."""
    modules = dict(block.named_modules())
    linear = lambda path: isinstance(modules.get(path), nn.Linear)  # noqa: E731
    if preset.split_attention:
        attention_fits = isinstance(modules.get(preset.split_attention), (nn.MultiheadAttention, SeparateProjectionAttention))
    else:
        attention_fits = all(linear(path) for path in preset.attention)
    return attention_fits and all(linear(path) for path in preset.mlp)


def tower_preset(model: Backbone, tower: str) -> TowerPreset:
    """The family's preset for ``tower``, checked against its first block; a clear error when it does not fit."""
    blocks = tower_blocks(model, tower)
    if not blocks:
        raise ValueError(f"LoRA: the {tower} tower of this {model.kind} backbone has no blocks named "
                         f"{model.block_prefixes[tower]}N; name the layers in method.target_modules")
    preset = model.lora_preset(tower)
    name, block = blocks[0]
    if preset_fits(preset, block):
        return preset
    linears = [path for path, module in block.named_modules() if isinstance(module, nn.Linear)]
    raise ValueError(f"LoRA: the {preset.family} preset of model.kind {model.kind!r} does not fit the {tower} tower: "
                     f"block {name} ({type(block).__name__}) has Linear layers {linears}; name them in "
                     f"method.target_modules")


def in_towers(name: str, model: Backbone, towers: list[str]) -> bool:
    """Whether module ``name`` belongs to one of ``towers`` (by the backbone's ``tower_prefixes``)."""
    for tower in towers:
        for prefix in model.tower_prefixes[tower]:
            if (name + ".").startswith(prefix if prefix.endswith(".") else prefix + "."):
                return True
    return False


def plan_targets(model: Backbone, cfg: LoraConfig) -> TargetPlan:
    """Resolve ``cfg`` to the Linear layers to adapt, splitting open_clip attention where needed.

    The model is changed in place only by splitting ``nn.MultiheadAttention`` modules whose
    projections are targeted (outputs are unchanged by the split).
    """
    if cfg.target_modules:
        return _plan_explicit(model, cfg)
    plan = TargetPlan(modules=[])
    for tower in cfg.towers:
        preset = tower_preset(model, tower)
        plan.families[tower] = preset.family
        paths = [path for target in cfg.targets for path in getattr(preset, target)]
        for block_name, _ in tower_blocks(model, tower):
            if preset.split_attention and "attention" in cfg.targets:
                plan.split += split_attention(model, [f"{block_name}.{preset.split_attention}"])
            plan.modules += [f"{block_name}.{path}" for path in paths]
    outside = [name for name in plan.modules if not in_towers(name, model, cfg.towers)]
    if outside:
        raise ValueError(f"LoRA: preset layers {outside[:3]} lie outside the {cfg.towers} tower prefixes")
    return _in_model_order(model, plan)


def _plan_explicit(model: Backbone, cfg: LoraConfig) -> TargetPlan:
    """``target_modules``: split every splittable attention in the towers' blocks, match, undo unused splits."""
    split: list[str] = []
    for tower in cfg.towers:
        for block_name, block in tower_blocks(model, tower):
            split += split_attention(model, [f"{block_name}.{path}" for path, module in block.named_modules()
                                             if isinstance(module, nn.MultiheadAttention) and _splittable(module)])
    modules = {name: module for name, module in model.named_modules() if name and in_towers(name, model, cfg.towers)}
    chosen: set[str] = set()
    for entry in cfg.target_modules:
        entry = entry.strip(".")
        matched = [name for name in modules if name == entry or name.endswith("." + entry)]
        if not matched:
            examples = [name for name, module in modules.items() if isinstance(module, nn.Linear)][:6]
            join_attention(model, split)
            raise ValueError(f"method.target_modules entry {entry!r} matches no module of the {cfg.towers} tower(s); "
                             f"Linear layers there are e.g. {examples}")
        not_linear = [f"{name} ({type(modules[name]).__name__})" for name in matched
                      if not isinstance(modules[name], nn.Linear)]
        if not_linear:
            join_attention(model, split)
            raise ValueError(f"method.target_modules entry {entry!r} matches {not_linear[:3]}: only Linear layers can "
                             f"carry LoRA (open_clip attention: attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj)")
        chosen.update(matched)
    unused = [name for name in split if not any(target.startswith(name + ".") for target in chosen)]
    join_attention(model, unused)
    plan = TargetPlan(modules=sorted(chosen), split=[name for name in split if name not in unused],
                      families={tower: "custom" for tower in cfg.towers})
    return _in_model_order(model, plan)


def _splittable(attention: nn.MultiheadAttention) -> bool:
    return attention._qkv_same_embed_dim and attention.bias_k is None and not attention.add_zero_attn


def _in_model_order(model: Backbone, plan: TargetPlan) -> TargetPlan:
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    missing = [name for name in plan.modules if name not in order]
    if missing:
        raise ValueError(f"LoRA: layers {missing[:3]} named by the preset do not exist in this model")
    plan.modules = sorted(set(plan.modules), key=order.__getitem__)
    return plan

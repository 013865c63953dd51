"""Which Linear layers get adapters: per-family presets, restricted to the chosen towers.

A preset names module paths inside one transformer block. The family of a tower is recognised
from its first block (``block_prefixes[tower] + "0"``), so a dual encoder with a timm or
open_clip vision tower and a BERT-like text tower gets the right preset for each tower.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ...backbones.base import Backbone
from .attention import SeparateProjectionAttention, join_attention, split_attention
from .config import LoraConfig


@dataclass(frozen=True)
class TowerPreset:
    """Module paths, relative to one transformer block, that ``targets`` map to.

    Attributes:
        family: name of the architecture family.
        attention: Linear layers of the attention (query, key, value, output projections).
        mlp: Linear layers of the MLP.
        split_attention: path of an ``nn.MultiheadAttention`` that must first be split into
            separate projections (open_clip); empty when the attention already has Linear layers.
    """

    family: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    split_attention: str = ""


PRESETS: tuple[TowerPreset, ...] = (
    TowerPreset("open_clip", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"),
                ("mlp.c_fc", "mlp.c_proj"), split_attention="attn"),
    TowerPreset("hf_clip", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
                ("mlp.fc1", "mlp.fc2")),
    TowerPreset("timm_vit", ("attn.qkv", "attn.proj"), ("mlp.fc1", "mlp.fc2")),
    TowerPreset("bert", ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
                ("intermediate.dense", "output.dense")),
)


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


def tower_blocks(model: Backbone, tower: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each transformer block of ``tower``, in order."""
    prefix = model.block_prefixes[tower]
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)$")
    found = [(int(m.group(1)), name, module) for name, module in model.named_modules() if (m := pattern.match(name))]
    return [(name, module) for _, name, module in sorted(found, key=lambda item: item[0])]


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
    """The preset that fits ``tower``'s blocks; a clear error when none does."""
    blocks = tower_blocks(model, tower)
    if not blocks:
        raise ValueError(f"LoRA: the {tower} tower of this {model.kind} backbone has no blocks named "
                         f"{model.block_prefixes[tower]}N; name the layers in method.target_modules")
    name, block = blocks[0]
    for preset in PRESETS:
        if preset_fits(preset, block):
            return preset
    linears = [path for path, module in block.named_modules() if isinstance(module, nn.Linear)]
    raise ValueError(f"LoRA: no preset ({', '.join(p.family for p in PRESETS)}) fits the {tower} tower: block {name} "
                     f"({type(block).__name__}) has Linear layers {linears}; name them in method.target_modules")


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

"""The LoRA method: inject peft adapters, train and save only them, merge them into the weights.

How a merged model is produced: the run's ``model/trainable.safetensors`` always holds only the
adapters (and the temperature if trained). :func:`merged_backbone` folds the adapters of an
adapted model into its Linear weights and returns a plain backbone whose state dict has exactly the
keys of a freshly built one; ``domainclip merge`` (:mod:`domainclip.core.export.merge`) does this for a finished run folder and writes the
full state dict to ``RUN/model/merged.safetensors``, loadable as ``model.weights`` of a recipe with
the same ``model`` section. With ``method.merge: true`` the run writes that file itself (through
:meth:`Lora.save_artifacts`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...backbones.base import Backbone
from ...checkpoint import save_tensors
from ..base import AdaptationMethod, TaskInfo, register_method
from .attention import join_attention, set_submodule
from .config import LoraConfig
from .presets import TargetPlan, plan_targets

ADAPTER_NAME = "default"
MERGED_FILE = "merged.safetensors"


def is_adapter_parameter(name: str) -> bool:
    """peft's adapter tensors: ``lora_A``, ``lora_B`` and DoRA's ``lora_magnitude_vector``."""
    return any(part.startswith("lora_") for part in name.split("."))


def is_temperature_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("logit_scale", "logit_bias")


@register_method("lora", LoraConfig)
class Lora(AdaptationMethod):
    """Frozen backbone plus peft LoRA/DoRA adapters on the preset (or named) Linear layers."""

    cfg: LoraConfig

    def __init__(self, cfg: LoraConfig):
        super().__init__(cfg)
        self.plan: TargetPlan | None = None
        self.full_parameters: set[str] = set()  # trained in full beside the adapters (patch embedding)

    def peft_config(self, target_modules: list[str]) -> peft.LoraConfig:
        """The peft config for ``target_modules`` (full module names)."""
        return peft.LoraConfig(r=self.cfg.rank, lora_alpha=self.cfg.alpha, lora_dropout=self.cfg.dropout,
                               use_dora=self.cfg.dora, target_modules=list(target_modules), bias="none")

    def plain_backbone(self, model: Backbone) -> Backbone:
        return merged_backbone(model, inplace=True)

    def apply(self, model: Backbone, task: TaskInfo | None = None) -> Backbone:
        """Freeze the backbone and inject adapters into the targeted layers of the chosen towers."""
        self.plan = plan_targets(model, self.cfg)
        for param in model.parameters():
            param.requires_grad_(False)
        peft.inject_adapter_in_model(self.peft_config(self.plan.modules), model, adapter_name=ADAPTER_NAME)
        if self.cfg.train_patch_embedding:
            owner, attribute = model.patch_embedding()
            conv = getattr(owner, attribute)
            own = {id(p) for p in conv.parameters()}
            self.full_parameters = {name for name, param in model.named_parameters() if id(param) in own}
        for name, param in model.named_parameters():
            param.requires_grad_(self._is_trained(name))
        return model

    def _is_trained(self, name: str) -> bool:
        return (is_adapter_parameter(name) or name in self.full_parameters
                or (self.cfg.train_logit_scale and is_temperature_parameter(name)))

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapter tensors (plus the temperature / patch embedding when trained), nothing else."""
        return {name: param.detach() for name, param in model.named_parameters() if self._is_trained(name)}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> None:
        """Restore adapters saved by :meth:`trainable_state` into a model prepared by :meth:`apply`."""
        where = source or "checkpoint"
        own = dict(model.named_parameters())
        expected = {name for name in own if self._is_trained(name)}
        unknown = sorted(set(state) - expected)
        if unknown:
            raise KeyError(f"{where}: {len(unknown)} keys are not trained parameters of this LoRA model "
                           f"(different towers, targets or rank?), e.g. {unknown[:3]}")
        missing = sorted(expected - set(state))
        if missing:
            raise KeyError(f"{where}: lacks {len(missing)} of the model's LoRA tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                if own[name].shape != value.shape:
                    raise ValueError(f"{where}: {name} has shape {tuple(value.shape)}, model expects {tuple(own[name].shape)}")
                own[name].copy_(value)

    def merged_model(self, model: Backbone) -> Backbone:
        """A plain copy of ``model`` with the adapters merged (used by WiSE-FT and export)."""
        return merged_backbone(model)

    def save_artifacts(self, model: Backbone, folder: Path) -> list[Path]:
        """Extra files for the run's ``model/`` folder: the merged backbone when ``merge`` is set."""
        if not self.cfg.merge:
            return []
        path = Path(folder) / MERGED_FILE
        save_merged(merged_backbone(model), path, source="training run")
        return [path]


def merged_backbone(model: Backbone, inplace: bool = False) -> Backbone:
    """``model`` with every LoRA/DoRA adapter merged into its weights, as a plain backbone.

    The result computes the same outputs as the adapted model, has exactly the state-dict keys of
    a freshly built backbone of the same config (open_clip attention is joined back into
    ``nn.MultiheadAttention``) and every parameter trainable, like a fresh backbone. ``model`` is
    left untouched unless ``inplace``.
    """
    target = model if inplace else copy.deepcopy(model)
    for name, module in list(target.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            set_submodule(target, name, module.get_base_layer())
    join_attention(target)
    if "peft_config" in vars(target):  # peft records its config on the module it injects into
        del target.peft_config
    for param in target.parameters():
        param.requires_grad_(True)
    return target


def save_merged(model: Backbone, path: str | Path, source: str = "") -> Path:
    """Write a plain backbone's full state dict as safetensors (with its config in the metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    leftovers = [name for name in model.state_dict() if is_adapter_parameter(name) or ".base_layer." in name]
    if leftovers:
        raise ValueError(f"{path}: the model still holds adapters ({leftovers[:3]}); pass it through merged_backbone first")
    metadata = {"format": "domainclip-backbone", "backbone": json.dumps(model.config_dict()), "source": source}
    save_tensors(model.state_dict(), path, metadata=metadata)
    return path


def adapted_layer_names(model: nn.Module) -> list[str]:
    """Names of the modules that carry adapters (peft tuner layers)."""
    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]

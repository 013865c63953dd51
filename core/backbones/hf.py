"""Hugging Face transformers CLIP and SigLIP backbones (hub id or local directory)."""
from __future__ import annotations

from typing import Any

import torch
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from ..checkpoint import require_safetensors
from .base import Backbone, HFTokenize, PreprocessConfig, Tokens, set_hf_checkpointing
from .factory import ModelConfig, register_backbone

SUPPORTED_MODEL_TYPES = ("clip", "siglip", "siglip2")
_RESAMPLE_NAMES = {2: "bilinear", 3: "bicubic"}


def preprocess_from_image_processor(processor: Any, overrides: dict[str, Any]) -> PreprocessConfig:
    """Read size, mean, std and filter from a CLIP/SigLIP image processor."""
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or processor.size
    if "shortest_edge" in size:
        image_size, mode = size["shortest_edge"], "shortest"
    else:
        image_size, mode = size["height"], "squash"
    if getattr(processor, "do_center_crop", False):
        mode = "shortest"
    resample = getattr(processor, "resample", 3)
    values = {
        "image_size": int(image_size),
        "mean": tuple(processor.image_mean),
        "std": tuple(processor.image_std),
        "interpolation": _RESAMPLE_NAMES.get(int(getattr(resample, "value", resample)), "bicubic"),
        "resize_mode": mode,
    }
    values.update(overrides)
    return PreprocessConfig(**values)


@register_backbone("hf")
class HFClipBackbone(Backbone):
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
        self.context_length = cfg.context_length or self.model.config.text_config.max_position_embeddings
        # SigLIP was trained on max-length padding without an attention mask; CLIP pads per batch.
        self.text_tokenizer = HFTokenize(AutoTokenizer.from_pretrained(cfg.name, **revision), self.context_length,
                                         pad_to_max=self.is_siglip)
        self._cfg = cfg
        layers = "encoder.layers."
        self.tower_prefixes = {"image": ("model.vision_model.", "model.visual_projection."),
                               "text": ("model.text_model.", "model.text_projection.")}
        self.block_prefixes = {"image": f"model.vision_model.{layers}", "text": f"model.text_model.{layers}"}

    @property
    def logit_scale(self) -> torch.nn.Parameter:  # type: ignore[override]
        return self.model.logit_scale

    @property
    def logit_bias(self) -> torch.nn.Parameter | None:  # type: ignore[override]
        return getattr(self.model, "logit_bias", None)

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

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self._cfg.name, "revision": self._cfg.revision,
                "context_length": self.context_length, "preprocess": self.preprocess.to_dict()}

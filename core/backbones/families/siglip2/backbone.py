"""SigLIP 2 behind the kit's interface.

SigLIP 2 reads images as a sequence of flattened patches with their grid shape (NaFlex). The kit
resizes every image to one square size (``preprocess.image_size`` = patch size x the side of the
largest square grid ``max_num_patches`` allows), so each batch is cut into the same
``side x side`` grid here and every patch is real (no pixel mask is needed). The text tower is
SigLIP's: max-length padding, no attention mask, the last position pooled through ``head``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, Siglip2ImageProcessor, Siglip2Processor

from ....checkpoint import require_safetensors
from ...base import Backbone, HFTokenize, PreprocessConfig, TokenFeatures, all_tokens_mask
from ...factory import ModelConfig, register_backbone
from ..hf_clip.backbone import HFClipBackbone, context_length_for, hf_model_type
from ..hf_clip.export import RESAMPLE, check_expressed, write_hf
from .prompts import Siglip2VisionEncoder


def patchify(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) images -> SigLIP 2 inputs: patches (B, h*w, P*P*C) in its processor's order and
    the grid shapes (B, 2)."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"SigLIP 2: image size {height}x{width} is not a multiple of the patch size {patch_size}")
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size).permute(0, 2, 4, 3, 5, 1)
    patches = patches.reshape(batch, rows * cols, patch_size * patch_size * channels)
    shapes = torch.tensor([[rows, cols]], dtype=torch.long, device=images.device).expand(batch, 2)
    return patches, shapes


def preprocess_from_siglip2_processor(processor: Any, patch_size: int, overrides: dict[str, Any]) -> PreprocessConfig:
    """The kit's preprocessing of a SigLIP 2 image processor: the largest square patch grid its
    ``max_num_patches`` allows, its mean, std and filter, squashed to a square; then ``overrides``."""
    side = int(math.isqrt(int(processor.max_num_patches)))
    resample = getattr(processor, "resample", 2)
    return PreprocessConfig(**{
        "image_size": side * patch_size, "mean": tuple(processor.image_mean), "std": tuple(processor.image_std),
        "interpolation": "bicubic" if int(getattr(resample, "value", resample)) == 3 else "bilinear",
        "resize_mode": "squash", **overrides})


@register_backbone("siglip2")
class Siglip2Backbone(HFClipBackbone):
    """``transformers`` Siglip2Model (hub id or local folder); text tower and heads as SigLIP's."""

    def __init__(self, cfg: ModelConfig):  # noqa: D107  (HFClipBackbone's checks do not apply)
        Backbone.__init__(self)
        if not cfg.name:
            raise ValueError("model.name: a Hugging Face hub id or local directory is required for kind 'siglip2'")
        revision = {"revision": cfg.revision} if cfg.revision else {}
        require_safetensors(cfg.name, "model.name")  # a local folder whose only weights are a pickle is refused
        self.model = AutoModel.from_pretrained(cfg.name, use_safetensors=True, **revision)
        if self.model.config.model_type != "siglip2":
            raise ValueError(f"model.name {cfg.name!r} is a {self.model.config.model_type!r} model; kind 'siglip2' "
                             f"loads SigLIP 2 (use kind 'hf' for CLIP / SigLIP)")
        self.is_siglip = True
        processor = AutoImageProcessor.from_pretrained(cfg.name, **revision)
        self.patch_size = int(self.model.config.vision_config.patch_size)
        self.preprocess = preprocess_from_siglip2_processor(processor, self.patch_size, cfg.preprocess)
        tokenizer = AutoTokenizer.from_pretrained(cfg.name, **revision)
        self.context_length = context_length_for(cfg, tokenizer, self.model.config.text_config)
        self.text_tokenizer = HFTokenize(tokenizer, self.context_length, pad_to_max=True)
        self._cfg = cfg
        self.tower_prefixes = {"image": ("model.vision_model.",), "text": ("model.text_model.",)}
        self.block_prefixes = {"image": "model.vision_model.encoder.layers.", "text": "model.text_model.encoder.layers."}

    def vision_inputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keyword arguments of the vision model for a batch of preprocessed images. Every patch is
        real, so no pixel mask is passed: an all-ones mask would only pin the pooling head to the
        patch count, which token merging reduces."""
        patches, shapes = patchify(images, self.patch_size)
        return {"pixel_values": patches, "pixel_attention_mask": None, "spatial_shapes": shapes}

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(**self.vision_inputs(images)).pooler_output

    def encode_image_tokens(self, images: torch.Tensor) -> TokenFeatures:
        inputs = self.vision_inputs(images)
        hidden = self.model.vision_model(**inputs).last_hidden_state  # after post_layernorm
        pooled = self.model.vision_model.head(hidden)
        return TokenFeatures(hidden, all_tokens_mask(hidden), pooled, "head")

    def prompt_vision_encoder(self, method: str) -> Siglip2VisionEncoder:
        return Siglip2VisionEncoder(self, method)

    def patch_embedding(self) -> tuple[nn.Module, str]:
        raise ValueError("SigLIP 2 embeds flattened patches with a Linear layer, not a convolution; multispectral "
                         "input (model.input) is not supported on kind 'siglip2'")

    def image_processor(self) -> Siglip2ImageProcessor:
        """A SigLIP 2 processor reproducing the kit's preprocessing on square images (its NaFlex
        resizing keeps the aspect ratio of other images, which the kit squashes to a square).

        Preprocessing it cannot express (``resize_mode: shortest``: it never centre-crops; a size
        that is no square grid of patches) is a ``ValueError`` naming the ``model.preprocess`` key
        and value: the exported folder would reload with other preprocessing."""
        side = self.preprocess.image_size // self.patch_size
        processor = Siglip2ImageProcessor(patch_size=self.patch_size, max_num_patches=side * side,
                                          image_mean=list(self.preprocess.mean), image_std=list(self.preprocess.std),
                                          resample=RESAMPLE[self.preprocess.interpolation])
        check_expressed(self.preprocess, preprocess_from_siglip2_processor(processor, self.patch_size, {}),
                        "Siglip2ImageProcessor")
        return processor

    def write_export(self, fmt: str, folder: Path, trained_names: list[str]) -> None:
        write_hf(self, folder, processor_class=Siglip2Processor, image_processor=self.image_processor())

    @classmethod
    def config_from_folder(cls, folder: Path) -> ModelConfig | None:
        return ModelConfig(kind="siglip2", name=str(folder)) if hf_model_type(folder) == "siglip2" else None

"""open_clip backbones: any registered architecture, pretrained tag, local file, ``hf-hub:`` id or
``local-dir:`` folder (open_clip's hub layout: ``open_clip_config.json`` + weights)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import difflib

import open_clip
import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from ....checkpoint import require_safetensors
from ...base import (Backbone, PreprocessConfig, TokenFeatures, Tokens, TowerPreset, WrappedModelTemperature,
                     all_tokens_mask)
from ...factory import ModelConfig, register_backbone
from .export import write_open_clip
from .prompts import OpenClipTextEncoder, OpenClipVisionEncoder
from .text_trim import encode_text_trimmed, end_of_text_positions, eos_positions, project_text, text_tokens_trimmed

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "model_configs"
OPEN_CLIP_BLOCK = TowerPreset("open_clip", ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"),
                              ("mlp.c_fc", "mlp.c_proj"), split_attention="attn")
"""open_clip's ``ResidualAttentionBlock``: its ``nn.MultiheadAttention`` is split into Linear layers first."""
open_clip.add_model_config(MODEL_CONFIG_DIR)


def preprocess_from_open_clip(cfg: dict[str, Any], overrides: dict[str, Any]) -> PreprocessConfig:
    """Translate open_clip's ``visual.preprocess_cfg`` into ours (plus recipe overrides)."""
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    values = {
        "image_size": int(size),
        "mean": tuple(cfg.get("mean")),
        "std": tuple(cfg.get("std")),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": "squash" if cfg.get("resize_mode") == "squash" else "shortest",
    }
    values.update(overrides)
    return PreprocessConfig(**values)


class OpenClipTokenize:
    """Picklable open_clip tokenizer returning the kit's token dict."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> Tokens:
        return {"input_ids": self.tokenizer(list(texts))}


@register_backbone("open_clip")
class OpenClipBackbone(WrappedModelTemperature, Backbone):
    """An open_clip CLIP / SigLIP / CustomTextCLIP model behind the kit's interface."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.name:
            raise ValueError("model.name: an open_clip architecture (for example ViT-B-32) or hf-hub:ORG/NAME is required")
        known = open_clip.list_models()
        if not cfg.name.startswith(("hf-hub:", "local-dir:")) and cfg.name not in known:
            close = difflib.get_close_matches(cfg.name, known, n=3)
            raise ValueError(f"model.name {cfg.name!r} is not an open_clip architecture; closest: {close}")
        require_safetensors(cfg.pretrained, "model.pretrained")  # never unpickle (issue 11; a tag passes)
        require_safetensors(cfg.name.removeprefix("local-dir:"), "model.name")  # local-dir: folder, else no-op
        kwargs: dict[str, Any] = {}
        if cfg.context_length:
            kwargs["force_context_length"] = cfg.context_length
        self.model = open_clip.create_model(cfg.name, pretrained=cfg.pretrained or None, **kwargs)
        self.text_tokenizer = OpenClipTokenize(
            open_clip.get_tokenizer(cfg.name, **({"context_length": cfg.context_length} if cfg.context_length else {})))
        self.preprocess = preprocess_from_open_clip(self.model.visual.preprocess_cfg, cfg.preprocess)
        self._cfg = cfg
        if hasattr(self.model, "text"):  # CustomTextCLIP: text tower is one module
            text_prefixes: tuple[str, ...] = ("model.text.",)
            text_blocks = _first_block_list_prefix(self.model.text, "model.text.")
        else:
            text_prefixes = ("model.token_embedding.", "model.positional_embedding", "model.transformer.",
                             "model.ln_final.", "model.text_projection")
            text_blocks = "model.transformer.resblocks."
        self.tower_prefixes = {"image": ("model.visual.",), "text": text_prefixes}
        self.block_prefixes = {"image": _first_block_list_prefix(self.model.visual, "model.visual."),
                               "text": text_blocks}

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def _text_features(self, tokens: Tokens) -> torch.Tensor:
        # same features and gradients as encode_text, without running the padding after end-of-text
        return encode_text_trimmed(self.model, tokens["input_ids"])

    # --- family interface -----------------------------------------------------------------
    export_formats = ("open_clip",)

    def encode_image_tokens(self, images: torch.Tensor) -> TokenFeatures:
        return vit_image_tokens(self.model.visual, images)

    def encode_text_tokens(self, tokens: Tokens) -> TokenFeatures:
        clip, ids = self.model, tokens["input_ids"]
        if not hasattr(clip, "token_embedding"):
            raise NotImplementedError(f"text tokens need an open_clip CLIP text transformer; {self._cfg.name!r} is a "
                                      f"{type(clip).__name__} with a separate text module")
        hidden = project_text(clip, text_tokens_trimmed(clip, ids))
        ids = ids[:, :hidden.shape[1]]  # the kept (trimmed) positions
        index = eos_positions(clip, ids)  # where the model pools (text_pool_type)
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        mask = positions.unsqueeze(0) <= end_of_text_positions(clip, ids).unsqueeze(1)  # after end-of-text: padding
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        return TokenFeatures(hidden, mask, pooled, "eos", index)

    def prompt_text_encoder(self, method: str) -> OpenClipTextEncoder:
        return OpenClipTextEncoder(self, method)

    def prompt_vision_encoder(self, method: str) -> OpenClipVisionEncoder:
        return OpenClipVisionEncoder(self.model.visual, method)

    def lora_preset(self, tower: str) -> TowerPreset:
        return OPEN_CLIP_BLOCK

    def patch_embedding(self) -> tuple[nn.Module, str]:
        if not hasattr(self.model.visual, "conv1"):
            return super().patch_embedding()
        return self.model.visual, "conv1"

    def write_export(self, fmt: str, folder: Path, trained_names: list[str]) -> None:
        write_open_clip(self, folder)

    @classmethod
    def config_from_folder(cls, folder: Path) -> ModelConfig | None:
        if (folder / "open_clip_config.json").is_file():
            return ModelConfig(kind="open_clip", name=f"local-dir:{folder}")
        return None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self._cfg.name, "pretrained": self._cfg.pretrained,
                "context_length": self._cfg.context_length, "preprocess": self.preprocess.to_dict()}


def _first_block_list_prefix(module: torch.nn.Module, prefix: str) -> str:
    """Name prefix of the largest ``ModuleList`` inside ``module`` (its transformer blocks)."""
    best_name, best_len = "", -1
    for name, child in module.named_modules():
        if isinstance(child, torch.nn.ModuleList) and len(child) > best_len:
            best_name, best_len = name, len(child)
    if best_len < 0:
        return prefix + "<no blocks>."
    return f"{prefix}{best_name}."


def vit_image_tokens(visual: nn.Module, images: torch.Tensor) -> TokenFeatures:
    """Final-layer tokens of an open_clip ``VisionTransformer`` after ``ln_post`` and ``proj``."""
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        raise NotImplementedError(f"image tokens need an open_clip VisionTransformer without attention pooling; "
                                  f"this image tower is a {type(visual).__name__}")
    x = visual.transformer(visual._embeds(images))
    pooled, _ = visual._pool(x)
    tokens = visual.ln_post(x)
    if visual.proj is not None:
        pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
    first = visual.pool_type == "tok" and not visual.final_ln_after_pool
    return TokenFeatures(tokens, all_tokens_mask(tokens), pooled, "first" if first else "head")


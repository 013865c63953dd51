"""open_clip backbones: any registered architecture, pretrained tag, local file, ``hf-hub:`` id or
``local-dir:`` folder (open_clip's hub layout: ``open_clip_config.json`` + weights)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch

from ..checkpoint import require_safetensors
from .base import Backbone, PreprocessConfig, Tokens
from .factory import ModelConfig, register_backbone

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
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
class OpenClipBackbone(Backbone):
    """An open_clip CLIP / SigLIP / CustomTextCLIP model behind the kit's interface."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.name:
            raise ValueError("model.name: an open_clip architecture (for example ViT-B-32) or hf-hub:ORG/NAME is required")
        known = open_clip.list_models()
        if not cfg.name.startswith(("hf-hub:", "local-dir:")) and cfg.name not in known:
            import difflib

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
    def logit_scale(self) -> torch.nn.Parameter:  # type: ignore[override]
        return self.model.logit_scale

    @property
    def logit_bias(self) -> torch.nn.Parameter | None:  # type: ignore[override]
        return getattr(self.model, "logit_bias", None)

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def _text_features(self, tokens: Tokens) -> torch.Tensor:
        # same features and gradients as encode_text, without running the padding after end-of-text
        from ..train.speed import encode_text_trimmed

        return encode_text_trimmed(self.model, tokens["input_ids"])

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

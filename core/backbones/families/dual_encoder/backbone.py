"""A dual encoder: any vision tower (timm or open_clip) plus any Hugging Face text encoder.

The towers are joined by projection heads into one embedding space. This is how a user brings a
domain vision model (a radiology ViT, a satellite backbone) together with a domain or multilingual
text encoder, and how the kit's offline compact base is built (MiniLM text tower from a PyPI
package, small ViT image tower trained by the kit).
"""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from open_clip.transformer import VisionTransformer as OpenClipViT
from torch import nn
from transformers import AutoModel, AutoTokenizer

from ....checkpoint import require_safetensors
from ...base import (Backbone, HFTokenize, PreprocessConfig, TokenFeatures, Tokens, TowerPreset, all_tokens_mask,
                     pool_text, set_hf_checkpointing)
from ...factory import ModelConfig, register_backbone
from ..open_clip.backbone import OPEN_CLIP_BLOCK, preprocess_from_open_clip, vit_image_tokens
from .export import CONFIG_FILE, WEIGHTS_FILE, trains_text_tower, write_dual_encoder
from .prompts import BertLikeTextEncoder, DualEncoderVisionEncoder

TIMM_VIT_BLOCK = TowerPreset("timm_vit", ("attn.qkv", "attn.proj"), ("mlp.fc1", "mlp.fc2"))
BERT_LAYER = TowerPreset("bert", ("attention.self.query", "attention.self.key", "attention.self.value",
                                  "attention.output.dense"), ("intermediate.dense", "output.dense"))


def default_context_length(text_path: str, tokenizer: Any) -> int:
    """Tokens kept per caption when ``model.context_length`` is not set: a sentence-transformers
    model's own ``max_seq_length`` (``sentence_bert_config.json``: 256 for all-MiniLM-L6-v2, which it
    was trained and is used with), else the tokenizer's limit, at most 512."""
    sentence_config = Path(text_path) / "sentence_bert_config.json"
    if sentence_config.is_file():
        try:
            length = json.loads(sentence_config.read_text()).get("max_seq_length")
        except (OSError, ValueError) as error:
            raise ValueError(f"{sentence_config}: not valid JSON ({error})") from None
        if isinstance(length, int) and length > 0:
            return length
    return min(int(tokenizer.model_max_length), 512)


def resolve_text_path(spec: str) -> str:
    """``pkg:<package>`` -> the model folder shipped inside that installed package."""
    if not spec.startswith("pkg:"):
        return spec
    package_name = spec[len("pkg:"):]
    try:
        package = importlib.import_module(package_name)
    except ImportError as err:
        raise ValueError(f"model.text {spec!r}: package {package_name!r} is not installed "
                         f"(for the offline base: pip install 'domainclip[base]')") from err
    getter = getattr(package, "get_model_path", None)
    folder = Path(getter()) if getter else Path(package.__file__).parent / "model"
    if not folder.is_dir():
        raise ValueError(f"model.text {spec!r}: no model folder at {folder}")
    return str(folder)


def build_projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"an identity projection needs model.embed_dim == the tower's width ({in_dim}), got {out_dim}")
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if kind == "mlp":
        hidden = max(in_dim, out_dim)
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    raise ValueError(f"model.projection must be 'linear', 'mlp' or 'identity', got {kind!r}")


class _TimmVision(nn.Module):
    def __init__(self, name: str, pretrained: bool, kwargs: dict[str, Any]):
        super().__init__()
        self.trunk = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        self.output_dim = int(self.trunk.num_features)
        data_cfg = timm.data.resolve_data_config({}, model=self.trunk)
        image_size = kwargs.get("img_size", data_cfg["input_size"][-1])
        self.preprocess = PreprocessConfig(
            image_size=int(image_size[-1] if isinstance(image_size, (list, tuple)) else image_size), mean=data_cfg["mean"], std=data_cfg["std"],
            interpolation="bicubic" if data_cfg.get("interpolation") == "bicubic" else "bilinear")
        self.blocks_prefix = "trunk.blocks."

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def set_grad_checkpointing(self, enable: bool) -> None:
        self.trunk.set_grad_checkpointing(enable)


class _OpenClipVision(nn.Module):
    def __init__(self, arch: str, pretrained: str):
        super().__init__()
        require_safetensors(pretrained, "model.vision_pretrained")
        model = open_clip.create_model(arch, pretrained=pretrained or None)
        self.trunk = model.visual
        self.output_dim = int(self.trunk.output_dim)
        self.preprocess = preprocess_from_open_clip(self.trunk.preprocess_cfg, {})
        self.blocks_prefix = "trunk.transformer.resblocks."

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def set_grad_checkpointing(self, enable: bool) -> None:
        self.trunk.set_grad_checkpointing(enable)


def build_vision_tower(spec: str, pretrained: str, kwargs: dict[str, Any]) -> nn.Module:
    family, _, name = spec.partition(":")
    if family == "timm" and name:
        return _TimmVision(name, pretrained not in ("", "false", "False"), kwargs)
    if family == "open_clip" and name:
        if kwargs:
            raise ValueError("model.vision_kwargs is only supported for timm vision towers")
        return _OpenClipVision(name, pretrained)
    raise ValueError(f"model.vision {spec!r}: expected 'timm:<model name>' or 'open_clip:<architecture>'")


@register_backbone("dual_encoder")
class DualEncoder(Backbone):
    """Vision tower + HF text encoder + projection heads, trained contrastively."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.vision or not cfg.text:
            raise ValueError("model.vision and model.text are both required for kind 'dual_encoder'")
        if cfg.text_pooling not in ("mean", "cls"):
            raise ValueError(f"model.text_pooling must be 'mean' or 'cls', got {cfg.text_pooling!r}")
        self.vision = build_vision_tower(cfg.vision, cfg.vision_pretrained, cfg.vision_kwargs)
        text_path = resolve_text_path(cfg.text)
        require_safetensors(text_path, "model.text")
        self.text = AutoModel.from_pretrained(text_path, use_safetensors=True)
        if getattr(self.text, "pooler", None) is not None:
            self.text.pooler = None  # pooling is ours; an unused pooler would idle in DDP
        tokenizer = AutoTokenizer.from_pretrained(text_path)
        self.context_length = cfg.context_length or default_context_length(text_path, tokenizer)
        self.text_tokenizer = HFTokenize(tokenizer, self.context_length)
        self.image_projection = build_projection(cfg.projection, self.vision.output_dim, cfg.embed_dim)
        self.text_projection = build_projection(cfg.text_projection or cfg.projection, int(self.text.config.hidden_size),
                                                cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.preprocess = PreprocessConfig(**{**self.vision.preprocess.to_dict(), **cfg.preprocess})
        self._cfg = cfg
        self.tower_prefixes = {"image": ("vision.", "image_projection."), "text": ("text.", "text_projection.")}
        self.block_prefixes = {"image": f"vision.{self.vision.blocks_prefix}",
                               "text": f"text.{_text_layers_prefix(self.text)}"}

    @property
    def embed_dim(self) -> int:
        return int(self._cfg.embed_dim)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_projection(self.vision(images))

    def _text_features(self, tokens: Tokens) -> torch.Tensor:
        mask = tokens.get("attention_mask")
        hidden = self.text(input_ids=tokens["input_ids"], attention_mask=mask).last_hidden_state
        if mask is None:
            mask = torch.ones(hidden.shape[:2], device=hidden.device)
        return self.text_projection(pool_text(hidden, mask, self._cfg.text_pooling))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        set_hf_checkpointing(self.text, enable)

    # --- family interface -----------------------------------------------------------------
    export_formats = ("dual_encoder",)

    def encode_image_tokens(self, images: torch.Tensor) -> TokenFeatures:
        trunk = self.vision.trunk
        if isinstance(trunk, OpenClipViT):
            inner = vit_image_tokens(trunk, images)
            tokens, pooled, pooling = inner.tokens, inner.pooled, inner.pooling
        else:  # timm: forward_features ends with the final norm; forward_head pools (and may norm again)
            hidden = trunk.forward_features(images)
            pooled = trunk.forward_head(hidden, pre_logits=True)
            fc_norm = getattr(trunk, "fc_norm", None)
            if isinstance(getattr(trunk, "norm", None), nn.Identity) and fc_norm is not None:
                hidden = fc_norm(hidden)  # average-pooled towers normalise after pooling, in fc_norm: tokens too
            tokens = hidden
            pooling = "first" if getattr(trunk, "global_pool", "") == "token" and isinstance(
                getattr(trunk, "fc_norm", None), nn.Identity) else "head"
        projected = self.image_projection(tokens)
        return TokenFeatures(projected, all_tokens_mask(projected), self.image_projection(pooled), pooling)

    def encode_text_tokens(self, tokens: Tokens) -> TokenFeatures:
        ids, mask = tokens["input_ids"], tokens.get("attention_mask")
        hidden = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        pooled = self.text_projection(pool_text(hidden, mask, self._cfg.text_pooling))
        linear = isinstance(self.text_projection, (nn.Linear, nn.Identity))
        pooling = "first" if self._cfg.text_pooling == "cls" else ("mean" if linear else "head")
        return TokenFeatures(self.text_projection(hidden), mask.bool(), pooled, pooling)

    def prompt_text_encoder(self, method: str) -> BertLikeTextEncoder:
        return BertLikeTextEncoder(self, method)

    def prompt_vision_encoder(self, method: str) -> DualEncoderVisionEncoder:
        return DualEncoderVisionEncoder(self, method)

    def lora_preset(self, tower: str) -> TowerPreset:
        if tower == "text":
            return BERT_LAYER
        return OPEN_CLIP_BLOCK if isinstance(self.vision.trunk, OpenClipViT) else TIMM_VIT_BLOCK

    def patch_embedding(self) -> tuple[nn.Module, str]:
        trunk = self.vision.trunk
        if hasattr(getattr(trunk, "patch_embed", None), "proj"):  # timm ViT
            return trunk.patch_embed, "proj"
        if hasattr(trunk, "conv1"):  # open_clip visual
            return trunk, "conv1"
        return super().patch_embedding()

    def write_export(self, fmt: str, folder: Path, trained_names: list[str]) -> None:
        write_dual_encoder(self, folder, trains_text_tower(trained_names))

    @classmethod
    def config_from_folder(cls, folder: Path) -> ModelConfig | None:
        config_file = folder / CONFIG_FILE
        if not (config_file.is_file() and (folder / WEIGHTS_FILE).is_file()):
            return None
        try:
            spec = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file} is not valid JSON: {error}") from None
        return ModelConfig(kind="compact_base", name=str(folder)) if "vision" in spec else None

    def config_dict(self) -> dict[str, Any]:
        keys = ("vision", "vision_pretrained", "vision_kwargs", "text", "text_pooling", "embed_dim",
                "projection", "text_projection", "context_length")
        return {"kind": self.kind, **{k: getattr(self._cfg, k) for k in keys}, "preprocess": self.preprocess.to_dict()}


def _text_layers_prefix(text_model: nn.Module) -> str:
    """Name prefix of the text encoder's layer list (``encoder.layer.`` for BERT-likes)."""
    num_layers = getattr(text_model.config, "num_hidden_layers", None)
    for name, child in text_model.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) == num_layers:
            return f"{name}."
    raise ValueError(f"cannot find the layer list of text encoder {type(text_model).__name__}")

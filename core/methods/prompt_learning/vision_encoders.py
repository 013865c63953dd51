"""Prompt-aware image encoding for each backbone family (MaPLe's vision prompts; the dual
encoder's towers are in ``dual_encoders.py``).

The prompt tokens are appended after the patch tokens (with positions already added, before the
pre-norm), replaced by the next layer's prompts before each deeper block, and dropped before
pooling, so a CLS- or average-pooled feature reads only image tokens directly.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ...backbones.base import Backbone
from .text_encoders import run_hf_layer, run_open_clip_blocks


class PromptVisionEncoder:
    """A backbone's frozen image tower with prompt tokens; refers to, never owns, its modules."""

    width: int
    num_layers: int

    def encode(self, images: torch.Tensor, first: torch.Tensor | None = None,
               deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Unnormalised image features (B, D) with ``first`` (n, W) prompt tokens appended and
        ``deep_prompts[i]`` (n, W) in their place before block i + 1; no prompts = the plain tower."""
        raise NotImplementedError

    def _check(self, first: torch.Tensor | None, deep_prompts: Sequence[torch.Tensor]) -> None:
        if deep_prompts and first is None:
            raise ValueError("deep vision prompts need first-layer prompts to replace")
        if len(deep_prompts) >= self.num_layers:
            raise ValueError(f"{len(deep_prompts)} deep vision prompts but the image tower has {self.num_layers} "
                             f"layers (at most {self.num_layers - 1} after the first)")


def append_prompts(x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Tokens ``x`` (B, L, W) followed by the same ``prompts`` (n, W) for every image: (B, L + n, W)."""
    return torch.cat([x, prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)


def replace_last_prompts(count: int, deep_prompts: Sequence[torch.Tensor]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A before-block hook putting ``deep_prompts[i - 1]`` in the last ``count`` tokens before block i >= 1."""

    def hook(index: int, x: torch.Tensor) -> torch.Tensor:
        if 1 <= index <= len(deep_prompts):
            return append_prompts(x[:, :-count], deep_prompts[index - 1])
        return x

    return hook


class OpenClipVisionEncoder(PromptVisionEncoder):
    """open_clip ``VisionTransformer`` (conv1 patches, class token, ln_pre, resblocks, pool, proj)."""

    def __init__(self, visual: nn.Module, method: str):
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise NotImplementedError(f"method {method!r}: vision prompts need an open_clip VisionTransformer image "
                                      f"tower; this model's is a {type(visual).__name__}")
        self.visual = visual
        self.width = int(visual.conv1.out_channels)
        self.num_layers = len(visual.transformer.resblocks)

    def encode(self, images: torch.Tensor, first: torch.Tensor | None = None,
               deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        self._check(first, deep_prompts)
        visual = self.visual
        x = visual._embeds(images)  # ends with ln_pre, a per-token norm: the prompts get it below
        count = 0
        if first is not None:
            count = first.shape[0]
            x = append_prompts(x, visual.ln_pre(first.to(x.dtype)))
        x = run_open_clip_blocks(visual.transformer, x, None, replace_last_prompts(count, deep_prompts))
        if count:
            x = x[:, :-count]
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled


class HFClipVisionEncoder(PromptVisionEncoder):
    """transformers ``CLIPVisionModel`` (embeddings, pre_layrnorm, encoder.layers, CLS, post_layernorm)."""

    def __init__(self, backbone: Backbone, method: str):
        if getattr(backbone, "is_siglip", False):
            raise NotImplementedError(f"method {method!r}: vision prompts support Hugging Face CLIP; SigLIP is not "
                                      "supported yet")
        self.hf = backbone.model
        self.vision = self.hf.vision_model
        self.width = int(self.vision.config.hidden_size)
        self.num_layers = len(self.vision.encoder.layers)

    def encode(self, images: torch.Tensor, first: torch.Tensor | None = None,
               deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        self._check(first, deep_prompts)
        x = self.vision.embeddings(images)
        count = 0
        if first is not None:
            count = first.shape[0]
            x = append_prompts(x, first)
        x = self.vision.pre_layrnorm(x)
        hook = replace_last_prompts(count, deep_prompts)
        for index, layer in enumerate(self.vision.encoder.layers):
            x = run_hf_layer(layer, hook(index, x), None)
        pooled = self.vision.post_layernorm(x[:, 0])
        return self.hf.visual_projection(pooled)


def build_vision_encoder(backbone: Backbone, method: str) -> PromptVisionEncoder:
    """The prompt-aware image encoder of ``backbone``'s family (open_clip ViT, HF CLIP, or a dual
    encoder's timm ViT / open_clip visual)."""
    from ...backbones.dual_encoder import DualEncoder
    from ...backbones.hf import HFClipBackbone
    from ...backbones.open_clip import OpenClipBackbone

    if isinstance(backbone, OpenClipBackbone):
        return OpenClipVisionEncoder(backbone.model.visual, method)
    if isinstance(backbone, HFClipBackbone):
        return HFClipVisionEncoder(backbone, method)
    if isinstance(backbone, DualEncoder):
        from .dual_encoders import DualEncoderVisionEncoder

        return DualEncoderVisionEncoder(backbone, method)
    raise ValueError(f"method {method!r}: vision prompts need an image transformer (model.kind 'open_clip' or 'hf' "
                     f"CLIP, or a 'dual_encoder' / 'compact_base' with a timm or open_clip ViT); model.kind "
                     f"{backbone.kind!r} is not supported")

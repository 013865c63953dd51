"""CoCoOp (Zhou et al., 2022): CoOp's context shifted per image by a small meta-net."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...backbones.base import Backbone
from ...backbones.prompting import Piece, PromptTextEncoder, PromptVisionEncoder
from ..base import register_method
from .context import initial_context
from .config import CoCoOpConfig
from .coop import class_prompt_pieces
from .model import PromptLearner, PromptLearningMethod


class CoCoOpPrompts(PromptLearner):
    """Shared context ``ctx`` (n_ctx, W) plus ``meta_net``: image features (D) -> shift (W)."""

    conditioned_on_image = True

    def __init__(self, cfg: CoCoOpConfig, encoder: PromptTextEncoder, class_names: Sequence[str], embed_dim: int):
        super().__init__(class_names)
        vectors, self.fixed_ids = initial_context(encoder, cfg.n_ctx, cfg.ctx_init, cfg.name)
        self.ctx = nn.Parameter(vectors)
        hidden = max(1, embed_dim // cfg.meta_hidden_ratio)
        self.meta_net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, encoder.width))

    def prompt_pieces(self, class_name: str) -> list[Piece]:
        return class_prompt_pieces(self.ctx.shape[0], self.fixed_ids, class_name)

    def text_features(self, encoder: PromptTextEncoder, class_names: Sequence[str],
                      image_features: torch.Tensor | None = None) -> torch.Tensor:
        if image_features is None:
            raise ValueError("CoCoOp prompts depend on the image: pass the images' features")
        batch, classes = image_features.shape[0], len(class_names)
        shift = self.meta_net(image_features.to(self.ctx.dtype))  # (B, W)
        ctx = self.ctx.unsqueeze(0) + shift.unsqueeze(1)  # (B, n_ctx, W)
        layout = self.layout(encoder, class_names, self.ctx.device).tile(batch)  # prompt b * C + c
        features = encoder.encode(layout, ctx.repeat_interleave(classes, dim=0))
        return features.reshape(batch, classes, -1)


@register_method("cocoop", CoCoOpConfig)
class CoCoOp(PromptLearningMethod):
    """CoCoOp: the context and the meta-net train; both towers are frozen."""

    cfg: CoCoOpConfig

    def build_learner(self, text_encoder: PromptTextEncoder, vision_encoder: PromptVisionEncoder | None,
                      class_names: list[str], backbone: Backbone) -> CoCoOpPrompts:
        return CoCoOpPrompts(self.cfg, text_encoder, class_names, backbone.embed_dim)

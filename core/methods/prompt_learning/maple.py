"""MaPLe (Khattak et al., 2023): deep prompts in both towers, image prompts coupled to text prompts."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...backbones.base import Backbone
from ...backbones.prompting import Piece, PromptTextEncoder, PromptVisionEncoder
from ..base import register_method
from .context import CTX_INIT_STD, initial_context
from .config import MaPLeConfig
from .coop import class_prompt_pieces
from .model import PromptLearner, PromptLearningMethod


class MaPLePrompts(PromptLearner):
    """Text prompts for layers 0..depth-1 and their linear couplings into the image tower.

    ``ctx`` (n_ctx, W_text) is the layer-0 context; ``deep_text[i]`` overwrites it before text
    block i + 1. ``vision_proj`` and ``deep_proj[i]`` map them to the image tower's width.
    """

    def __init__(self, cfg: MaPLeConfig, encoder: PromptTextEncoder, vision_width: int, class_names: Sequence[str]):
        super().__init__(class_names)
        vectors, self.fixed_ids = initial_context(encoder, cfg.n_ctx, cfg.ctx_init, cfg.name)
        n_ctx = vectors.shape[0]
        self.ctx = nn.Parameter(vectors)
        self.vision_proj = nn.Linear(encoder.width, vision_width)
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, encoder.width).normal_(std=CTX_INIT_STD)) for _ in range(cfg.depth - 1)])
        self.deep_proj = nn.ModuleList([nn.Linear(encoder.width, vision_width) for _ in range(cfg.depth - 1)])

    def prompt_pieces(self, class_name: str) -> list[Piece]:
        return class_prompt_pieces(self.ctx.shape[0], self.fixed_ids, class_name)

    def text_features(self, encoder: PromptTextEncoder, class_names: Sequence[str],
                      image_features: torch.Tensor | None = None) -> torch.Tensor:
        layout = self.layout(encoder, class_names, self.ctx.device)
        return encoder.encode(layout, self.ctx, list(self.deep_text))

    def vision_prompts(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.vision_proj(self.ctx), [proj(prompt) for proj, prompt in zip(self.deep_proj, self.deep_text)]


@register_method("maple", MaPLeConfig)
class MaPLe(PromptLearningMethod):
    """MaPLe: text prompts, their couplings into the image tower; both towers are frozen."""

    cfg: MaPLeConfig
    needs_vision_prompts = True

    def build_learner(self, text_encoder: PromptTextEncoder, vision_encoder: PromptVisionEncoder | None,
                      class_names: list[str], backbone: Backbone) -> MaPLePrompts:
        layers = min(text_encoder.num_layers, vision_encoder.num_layers)
        if self.cfg.depth > layers:
            raise ValueError(f"method.depth={self.cfg.depth} but the text tower has {text_encoder.num_layers} layers "
                             f"and the image tower {vision_encoder.num_layers}; set depth to at most {layers}")
        return MaPLePrompts(self.cfg, text_encoder, vision_encoder.width, class_names)

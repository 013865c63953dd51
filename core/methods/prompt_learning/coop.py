"""CoOp (Zhou et al., 2022): learned context words, shared by all classes or one per class."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...backbones.base import Backbone
from ...backbones.prompting import ContextSlot, Piece, PromptTextEncoder, PromptVisionEncoder
from ..base import register_method
from .config import CoOpConfig
from .context import initial_context
from .model import PromptLearner, PromptLearningMethod, log


def class_prompt_pieces(ctx_count: int, fixed_ids: tuple[int, ...], class_name: str, position: str = "end") -> list[Piece]:
    """Pieces of "{context} {class}." with the class name at ``position`` (end, middle, front)."""
    if position == "end":
        return [ContextSlot(ctx_count), fixed_ids, f"{class_name}."]
    if position == "middle":
        half = ctx_count // 2
        return [ContextSlot(half), class_name, ContextSlot(ctx_count - half), "."]
    return [class_name, ContextSlot(ctx_count), "."]


class CoOpPrompts(PromptLearner):
    """Context vectors ``ctx``: (n_ctx, W) shared, or (classes, n_ctx, W) class-specific."""

    def __init__(self, cfg: CoOpConfig, encoder: PromptTextEncoder, class_names: Sequence[str]):
        super().__init__(class_names)
        vectors, self.fixed_ids = initial_context(encoder, cfg.n_ctx, cfg.ctx_init, cfg.name)
        if self.fixed_ids and cfg.position != "end":
            raise ValueError(f"method.position={cfg.position!r} needs the whole ctx_init learned: n_ctx={cfg.n_ctx} "
                             f"leaves {len(self.fixed_ids)} of its tokens fixed (set n_ctx to 0)")
        if cfg.class_specific:
            vectors = vectors.unsqueeze(0).repeat(len(self.class_names), 1, 1)
        self.ctx = nn.Parameter(vectors)
        self.position = cfg.position
        self.class_specific = cfg.class_specific
        self._class_index = {name: i for i, name in enumerate(self.class_names)}

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[-2]

    def prompt_pieces(self, class_name: str) -> list[Piece]:
        return class_prompt_pieces(self.n_ctx, self.fixed_ids, class_name, self.position)

    def context_for(self, class_names: Sequence[str]) -> torch.Tensor:
        """(C, n_ctx, W): each class's own context; unseen classes get the mean of the learned ones."""
        if not self.class_specific:
            return self.ctx.unsqueeze(0).expand(len(class_names), -1, -1)
        unseen = [name for name in class_names if name not in self._class_index]
        if unseen:
            log.warning("class-specific CoOp context: %d class(es) not seen in training use the mean context: %s",
                        len(unseen), unseen[:10])
        mean = self.ctx.mean(dim=0)
        return torch.stack([self.ctx[self._class_index[name]] if name in self._class_index else mean
                            for name in class_names])

    def text_features(self, encoder: PromptTextEncoder, class_names: Sequence[str],
                      image_features: torch.Tensor | None = None) -> torch.Tensor:
        layout = self.layout(encoder, class_names, self.ctx.device)
        return encoder.encode(layout, self.context_for(class_names))


@register_method("coop", CoOpConfig)
class CoOp(PromptLearningMethod):
    """CoOp: only the context vectors train; both towers are frozen."""

    cfg: CoOpConfig

    def build_learner(self, text_encoder: PromptTextEncoder, vision_encoder: PromptVisionEncoder | None,
                      class_names: list[str], backbone: Backbone) -> CoOpPrompts:
        return CoOpPrompts(self.cfg, text_encoder, class_names)

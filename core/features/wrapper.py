"""A frozen backbone wrapped with the few trainable tensors of a frozen-feature method.

Projector-only alignment and Tip-Adapter-F train small modules on top of towers that never
change. They need a model of their own so that the one training loop (and Accelerate's DDP
wrapper, which only syncs gradients of what runs through ``forward``) sees exactly the trainable
part, while evaluation still gets the ordinary backbone interface (``encode_image``,
``encode_text``, ``tokenize``, ``preprocess``). The wrapped backbone is always in eval mode:
a frozen tower is a fixed function (no dropout), and that is what makes its features cacheable.
"""
from __future__ import annotations

from typing import Any

import torch

from ..backbones.base import Backbone, Tokens


class FrozenBackboneWrapper(Backbone):
    """``base`` frozen (no gradients, eval mode) behind the backbone interface.

    Subclasses add their trainable modules and define ``logit_scale`` (and ``logit_bias``).
    Parameter names of the base get the prefix ``base.``; ``tower_prefixes`` and
    ``block_prefixes`` follow, so tower-based tools keep working on the wrapper.
    """

    def __init__(self, base: Backbone):
        super().__init__()
        if isinstance(base, FrozenBackboneWrapper):
            raise ValueError(f"{type(base).__name__} is already a frozen-feature model; apply one method to a backbone")
        self.base = base.requires_grad_(False)
        self.base.eval()
        self.adopt_identity(base, "base")

    def train(self, mode: bool = True) -> "FrozenBackboneWrapper":
        super().train(mode)
        self.base.eval()
        return self

    @property
    def embed_dim(self) -> int:
        return self.base.embed_dim

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.encode_image(images, normalize=False)

    def _text_features(self, tokens: Tokens) -> torch.Tensor:
        return self.base.encode_text(tokens, normalize=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The frozen towers run without gradients: there are no activations to recompute."""

    def config_dict(self) -> dict[str, Any]:
        return self.base.config_dict()

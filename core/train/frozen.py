"""Frozen towers: run them in eval mode and never recompute their text features.

When a method leaves a whole tower without trainable parameters (LiT's locked text tower, the
compact base's MiniLM), the tower is put in eval mode (no dropout: a frozen tower is a fixed
function) and, for the text tower, the features of each distinct caption are computed once and
reused in every later step and epoch.
"""
from __future__ import annotations

import torch
from ..backbones.base import Backbone
from ..methods.base import AdaptationMethod


def frozen_towers(model: Backbone) -> list[str]:
    """Towers ("image", "text") none of whose parameters train."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return [tower for tower in ("image", "text")
            if not trainable & set(model.tower_parameter_names(tower))]


def set_frozen_towers_eval(model: Backbone, towers: list[str]) -> None:
    """Put every module that lies wholly inside a frozen tower in eval mode."""
    prefixes = tuple(p for tower in towers for p in model.tower_prefixes[tower])
    for name, module in model.named_modules():
        if name and (f"{name}." if not name.endswith(".") else name).startswith(prefixes):
            module.eval()


class TextFeatureCache:
    """Text features of a frozen text tower, computed once per distinct caption."""

    def __init__(self, model: Backbone, batch_size: int = 256):
        self.model = model
        self.batch_size = batch_size
        self.features: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @torch.no_grad()
    def __call__(self, captions: list[str], device: torch.device) -> torch.Tensor:
        missing = list(dict.fromkeys(c for c in captions if c not in self.features))
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            tokens = {k: v.to(device) for k, v in self.model.tokenize(chunk).items()}
            encoded = self.model.encode_text(tokens, normalize=True).float().cpu()
            self.features.update(zip(chunk, encoded))
        return torch.stack([self.features[c] for c in captions]).to(device)


def uses_text_cache(model: Backbone, method: AdaptationMethod) -> bool:
    """A text cache is exact when the text tower is frozen and the method keeps the default
    contrastive objective (a method with its own ``compute_loss`` may change the text path)."""
    return "text" in frozen_towers(model) and type(method).compute_loss is AdaptationMethod.compute_loss

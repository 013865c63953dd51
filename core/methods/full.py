"""Full fine-tuning, locked towers (LiT) and layer-wise learning-rate decay."""
from __future__ import annotations

from dataclasses import dataclass

from ..backbones.base import Backbone
from .base import AdaptationMethod, MethodConfig, TaskInfo, register_method


@dataclass
class FullConfig(MethodConfig):
    """Train every weight, or lock a tower and optionally unlock its last blocks.

    Attributes:
        lock_image: freeze the image tower (LiT: "locked-image tuning").
        lock_text: freeze the text tower (the kit's compact base trains with a locked text tower).
        unlocked_image_blocks: with ``lock_image``, train the last N image blocks plus the head
            (final norm, pooling, projection).
        unlocked_text_blocks: the same for the text tower.
        train_logit_scale: learn the temperature (and SigLIP bias) as well.
        layer_decay: layer-wise learning-rate decay; a parameter in group g of a tower with G
            groups (embedding, blocks..., head) gets ``lr * layer_decay ** (G - 1 - g)``. 1.0 = off.
    """

    name: str = "full"
    lock_image: bool = False
    lock_text: bool = False
    unlocked_image_blocks: int = 0
    unlocked_text_blocks: int = 0
    train_logit_scale: bool = True
    layer_decay: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"method.layer_decay must be in (0, 1], got {self.layer_decay}")
        for key, lock in (("unlocked_image_blocks", "lock_image"), ("unlocked_text_blocks", "lock_text")):
            if getattr(self, key) < 0:
                raise ValueError(f"method.{key} must be >= 0, got {getattr(self, key)}")
            if getattr(self, key) and not getattr(self, lock):  # an unlocked tower trains all its blocks anyway
                raise ValueError(f"method.{key}={getattr(self, key)} unlocks blocks of a locked tower: set "
                                 f"method.{lock}: true (without it the whole tower trains)")


@register_method("full", FullConfig)
class FullFineTune(AdaptationMethod):
    cfg: FullConfig

    def plain_backbone(self, model: Backbone) -> Backbone:
        return model

    def apply(self, model: Backbone, task: TaskInfo | None = None) -> Backbone:
        params = dict(model.named_parameters())
        for param in params.values():
            param.requires_grad_(True)
        for tower, locked, unlocked in (("image", self.cfg.lock_image, self.cfg.unlocked_image_blocks),
                                        ("text", self.cfg.lock_text, self.cfg.unlocked_text_blocks)):
            if not locked:
                continue
            groups = model.tower_parameter_groups(tower)
            n_blocks = len(groups) - 2
            if unlocked > n_blocks:
                raise ValueError(f"method.unlocked_{tower}_blocks={unlocked} but the {tower} tower has {n_blocks} blocks")
            keep_trainable = {n for g in (groups[len(groups) - 1 - unlocked:] if unlocked else []) for n in g}
            for name in (n for g in groups for n in g):
                params[name].requires_grad_(name in keep_trainable)
        if not self.cfg.train_logit_scale:
            for name, param in params.items():
                if "logit_scale" in name or "logit_bias" in name:
                    param.requires_grad_(False)
        self._group_index = {}
        if self.cfg.layer_decay < 1.0:
            for tower in ("image", "text"):
                groups = model.tower_parameter_groups(tower)
                for g, names in enumerate(groups):
                    for name in names:
                        self._group_index[name] = (g, len(groups))
        return model

    def lr_scale(self, model: Backbone, name: str) -> float:
        if name not in getattr(self, "_group_index", {}):
            return 1.0
        g, count = self._group_index[name]
        return self.cfg.layer_decay ** (count - 1 - g)

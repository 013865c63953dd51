"""Adversarial fine-tuning of the image tower: FARE and TeCoA, on top of LoRA or full fine-tuning.

- ``fare`` (Schlarmann et al. 2024, "Robust CLIP", the RobustVLM code): unsupervised. A PGD
  attack pushes an image's embedding away from the *frozen original* encoder's embedding of the
  clean image; the tower is trained to keep the adversarial embedding close (squared L2) to it,
  so zero-shot heads and downstream models built on the original embedding keep working.
- ``tecoa`` (Mao et al. 2023, "Understanding zero-shot adversarial robustness"): supervised.
  The attack raises the cross-entropy of the zero-shot head (the training classes' prompt
  ensemble from the frozen text tower); the tower is trained on that adversarial cross-entropy.

What trains is decided by ``tower_method``: a ``lora`` or ``full`` method section whose
``apply``, parameter groups, saved state and artifacts are used as they are (the text tower must
stay frozen: both objectives only see images). Attacks run in pixel space
(:class:`~domainclip.core.robustness.PixelSpace`) with the global RNG, which training checkpoints
save, so a resumed run draws the same random starts.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone
from ..eval.zeroshot import build_zeroshot_classifier
from ..robustness.attack import pgd_linf
from ..robustness.pixels import PixelSpace
from .base import AdaptationMethod, MethodConfig, TaskInfo, build_method, register_method
from .full import FullConfig
from .lora.config import LoraConfig

TOWER_METHODS = ("lora", "full")


@dataclass
class AdversarialConfig(MethodConfig):
    """Shared settings of ``fare`` and ``tecoa``.

    Attributes:
        tower_method: what trains, as a method section: ``{name: lora, towers: [image], rank: 8, ...}``
            (default) or ``{name: full, lock_text: true, train_logit_scale: false, ...}`` (every
            option of those methods applies; the text tower and the temperature stay frozen).
        eps: attack radius in 1/255 pixel steps (RobustVLM trains at 2 and 4).
        steps: PGD steps per training batch (RobustVLM: 10).
        step_size: PGD step in 1/255 units (RobustVLM: 1).
        random_start: start each attack at a uniform random point of the eps-ball.
    """

    tower_method: MethodConfig = field(default_factory=lambda: LoraConfig(towers=["image"]))  # type: ignore[arg-type]
    eps: float = 4.0
    steps: int = 10
    step_size: float = 1.0
    random_start: bool = True

    def __post_init__(self) -> None:
        tower = self.tower_method
        if tower.name not in TOWER_METHODS:
            raise ValueError(f"method.tower_method.name must be one of {list(TOWER_METHODS)}, got {tower.name!r}")
        if isinstance(tower, LoraConfig) and "text" in tower.towers:
            raise ValueError(f"method.tower_method: {self.name} trains the image tower only; set "
                             f"tower_method.towers: [image] (got {tower.towers})")
        if isinstance(tower, FullConfig) and (not tower.lock_text or tower.lock_image):
            raise ValueError(f"method.tower_method: {self.name} trains the image tower only; set "
                             f"tower_method.lock_text: true and lock_image: false")
        if tower.train_logit_scale:
            raise ValueError(f"method.tower_method: {self.name} does not use the temperature; set "
                             f"tower_method.train_logit_scale: false")
        if self.eps < 0 or self.step_size < 0 or self.steps < 0:
            raise ValueError(f"method.eps, step_size and steps must be >= 0, got {self.eps}, {self.step_size}, {self.steps}")


@dataclass
class FareConfig(AdversarialConfig):
    """FARE: adversarial embeddings kept close to the frozen original encoder's clean embeddings.

    Attributes:
        clean_weight: weight of the clean image's distance in the loss, the adversarial one gets
            ``1 - clean_weight`` (RobustVLM: 0).
    """

    name: str = "fare"
    clean_weight: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.clean_weight <= 1.0:
            raise ValueError(f"method.clean_weight must be in [0, 1], got {self.clean_weight}")


@dataclass
class TecoaConfig(AdversarialConfig):
    """TeCoA (needs labelled training data: the classes' prompt ensemble is the head)."""

    name: str = "tecoa"


def image_embeddings(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image features through the model's ``forward`` (so DDP and mixed precision
    apply); the text side is skipped with a placeholder text feature."""
    return model(images, None, images.new_zeros(1, 1))["image_features"].float()


class AdversarialMethod(AdaptationMethod):
    """The tower method's hooks, plus adversarial examples of each batch (see the module docstring)."""

    cfg: AdversarialConfig

    def __init__(self, cfg: AdversarialConfig):
        super().__init__(cfg)
        self.tower = build_method(cfg.tower_method)
        if hasattr(self.tower, "merged_model"):  # WiSE-FT and export merge LoRA adapters through it
            self.merged_model = self.tower.merged_model
        self.space: PixelSpace | None = None

    def apply(self, model: Backbone, task: TaskInfo | None = None) -> Backbone:
        self.space = PixelSpace(model.preprocess)
        return self.tower.apply(model, task)

    def plain_backbone(self, model: Backbone) -> Backbone | None:
        """The tower method's plain backbone (full: as trained; LoRA: merged): full-format exports take it."""
        return self.tower.plain_backbone(model)

    def adversarial_images(self, model: nn.Module, images: torch.Tensor,
                           loss_of_features: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Normalised images whose pixels lie within ``eps`` of ``images``' and raise the loss."""
        inner = getattr(model, "module", model)  # the attack needs no gradient synchronisation
        pixels = self.space.to_pixels(images)
        adversarial = pgd_linf(lambda p: loss_of_features(image_embeddings(inner, self.space.normalise(p))), pixels,
                               self.cfg.eps / 255, self.cfg.steps, self.cfg.step_size / 255, self.cfg.random_start)
        return self.space.normalise(adversarial)

    # --- what trains and what is saved: the tower method's -----------------------------------
    def param_groups(self, model: Backbone, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return self.tower.param_groups(model, lr, weight_decay)

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.tower.trainable_state(model)

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> None:
        self.tower.load_trainable_state(model, state, source)

    def save_artifacts(self, model: Backbone, folder: Path) -> list[Path]:
        return self.tower.save_artifacts(model, folder)

    def trainable_parameter_count(self, model: nn.Module) -> int:
        return self.tower.trainable_parameter_count(model)


@register_method("fare", FareConfig)
class Fare(AdversarialMethod):
    """Adversarial embeddings kept close (squared L2) to the frozen original encoder's clean ones."""

    cfg: FareConfig

    def apply(self, model: Backbone, task: TaskInfo | None = None) -> Backbone:
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)  # the original encoder, frozen
        return super().apply(model, task)

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], loss_fn: nn.Module) -> torch.Tensor:
        images = batch["images"]
        self.reference.to(images.device)
        with torch.no_grad():
            target = self.reference.encode_image(images, normalize=True).float()

        def distance(features: torch.Tensor) -> torch.Tensor:
            return ((features - target) ** 2).sum(dim=-1)

        adversarial = self.adversarial_images(model, images, distance)
        if not self.cfg.clean_weight:
            return distance(image_embeddings(model, adversarial)).mean()
        both = distance(image_embeddings(model, torch.cat([adversarial, images])).view(2, len(images), -1))
        return (1 - self.cfg.clean_weight) * both[0].mean() + self.cfg.clean_weight * both[1].mean()


@register_method("tecoa", TecoaConfig)
class Tecoa(AdversarialMethod):
    """Adversarial cross-entropy against the frozen prompt-ensemble head of the training classes."""

    cfg: TecoaConfig

    def apply(self, model: Backbone, task: TaskInfo | None = None) -> Backbone:
        if task is None or not task.class_names:
            raise ValueError("method tecoa needs labelled training data (data.train.label_key or a labelled format): "
                             "the training classes' prompt ensemble is the head it attacks and trains against")
        model = super().apply(model, task)
        templates = task.templates or ["a photo of a {}."]
        self.head = build_zeroshot_classifier(model, task.class_names, templates)  # text tower frozen: fixed
        return model

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], loss_fn: nn.Module) -> torch.Tensor:
        images, labels = batch["images"], batch["labels"]
        if (labels < 0).any():
            raise ValueError("method tecoa: a training batch holds unlabelled items (label -1); every training "
                             "item needs a class label")
        head = self.head.to(images.device)
        scale = getattr(model, "module", model).logit_scale.exp().detach().float()

        def cross_entropy(features: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(scale * features @ head, labels, reduction="none")

        adversarial = self.adversarial_images(model, images, cross_entropy)
        return cross_entropy(image_embeddings(model, adversarial)).mean()

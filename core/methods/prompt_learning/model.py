"""The frozen backbone with learned prompts, and what every prompt-learning method shares.

``apply`` wraps the backbone in a :class:`PromptedBackbone`: the backbone's parameters are
frozen and the method's :class:`PromptLearner` (context vectors, meta-net, couplings) is the only
trainable part, registered under ``prompt_learner.`` so a checkpoint holds nothing else. Training
calls the wrapper's ``forward(images, classify=True)`` (through any DDP wrapper, so gradients are
synchronised) for logits over the training classes, and cross-entropy against the labels is the
objective (CoOp); evaluation classifies any class names with the learned prompts.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones.base import Backbone, Tokens
from ...backbones.prompting import Piece, PromptLayout, PromptTextEncoder, PromptVisionEncoder
from ...encode import eval_mode
from ..base import AdaptationMethod, TaskInfo

log = logging.getLogger("domainclip.methods.prompt_learning")

EVAL_PROMPTS_PER_CHUNK = 2048
"""Image-conditioned prompts (images x classes) encoded at once when evaluating CoCoOp."""

_LAYOUT_CACHE_SIZE = 8


class PromptLearner(nn.Module):
    """The learned part of a prompt-learning method: builds class text features from prompts.

    Subclasses say how a class's prompt is laid out (``prompt_pieces``) and how its features are
    computed (``text_features``); MaPLe also returns image-tower prompts.
    """

    conditioned_on_image: ClassVar[bool] = False

    def __init__(self, class_names: Sequence[str]):
        super().__init__()
        self.class_names = list(class_names)
        self._layouts: dict[tuple[str, ...], PromptLayout] = {}

    def prompt_pieces(self, class_name: str) -> list[Piece]:
        raise NotImplementedError

    def layout(self, encoder: PromptTextEncoder, class_names: Sequence[str], device: torch.device) -> PromptLayout:
        """Token layout of the prompts of ``class_names`` (cached per list of names)."""
        key = tuple(class_names)
        if key not in self._layouts:
            if len(self._layouts) >= _LAYOUT_CACHE_SIZE:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[key] = encoder.tokenizer.layout([self.prompt_pieces(name) for name in key], key)
        return self._layouts[key].to(device)

    def text_features(self, encoder: PromptTextEncoder, class_names: Sequence[str],
                      image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised features of the classes' prompts: (C, D), or (B, C, D) per image."""
        raise NotImplementedError

    def vision_prompts(self) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        """(first-layer prompts (n, W), deeper prompts) for the image tower, or None."""
        return None


class PromptedBackbone(Backbone):
    """A frozen backbone plus learned prompts, behind the ordinary backbone interface.

    ``encode_image`` uses the image-tower prompts when the method has them (MaPLe);
    ``encode_text`` of free text (captions, retrieval) is the plain frozen text tower, since
    learned prompts are defined for class names only. Attributes the wrapper does not define are
    read from the wrapped backbone (``model.model`` still reaches the library model).
    """

    def __init__(self, backbone: Backbone, learner: PromptLearner, text_encoder: PromptTextEncoder,
                 vision_encoder: PromptVisionEncoder | None = None):
        super().__init__()
        self.backbone = backbone
        self.prompt_learner = learner
        self.text_encoder = text_encoder
        self.vision_encoder = vision_encoder
        self.adopt_identity(backbone, "backbone")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            backbone = self.__dict__.get("_modules", {}).get("backbone")
            if backbone is None:
                raise
            return getattr(backbone, name)

    @property
    def logit_scale(self) -> nn.Parameter:  # type: ignore[override]
        return self.backbone.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:  # type: ignore[override]
        return self.backbone.logit_bias

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    def train(self, mode: bool = True) -> PromptedBackbone:
        """Train mode for the prompts; the frozen towers stay in eval mode (no dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @property
    def token_merging_refusal(self) -> str | None:
        if self.vision_encoder is None:
            return None  # CoOp / CoCoOp: the image tower is the plain one (CoCoOp conditions on its pooled feature)
        return ("the image tower carries learned vision prompts (MaPLe), which are appended to the token sequence "
                "and replaced block by block; merging would mix them with the patch tokens")

    def config_dict(self) -> dict[str, Any]:
        return self.backbone.config_dict()

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        prompts = self.prompt_learner.vision_prompts()
        if prompts is None:
            return self.backbone._image_features(images)
        first, deep = prompts
        return self.vision_encoder.encode(images, first, deep)

    def _text_features(self, tokens: Tokens) -> torch.Tensor:
        return self.backbone._text_features(tokens)

    def class_text_features(self, class_names: Sequence[str], image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised features of the learned prompts of ``class_names``: (C, D), or (B, C, D)
        for image-conditioned prompts (CoCoOp, which needs ``image_features``)."""
        if len(class_names) == 0:
            raise ValueError("class_names is empty")
        features = self.prompt_learner.text_features(self.text_encoder, list(class_names), image_features)
        return F.normalize(features, dim=-1)

    def class_logits(self, image_features: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """``logit_scale * cos(image, class prompt)``: (B, C) for normalised ``image_features``."""
        scale = self.logit_scale.exp()
        if self.prompt_learner.conditioned_on_image:
            text = self.class_text_features(class_names, image_features)
            return scale * torch.einsum("bd,bcd->bc", image_features, text.to(image_features.dtype))
        text = self.class_text_features(class_names)
        return scale * image_features @ text.to(image_features.dtype).T

    def forward(self, images: torch.Tensor, tokens: Tokens | None = None, text_features: torch.Tensor | None = None,
                classify: bool = False) -> dict[str, torch.Tensor | None]:
        """The backbone contract; with ``classify=True`` also ``class_logits`` (B, C) over the
        training classes from the learned prompts (and no text features)."""
        if not classify:
            if text_features is None:
                return super().forward(images, tokens)
            return super().forward(images, tokens, text_features)
        image_features = self.encode_image(images)
        return {"image_features": image_features,
                "class_logits": self.class_logits(image_features, self.prompt_learner.class_names),
                "logit_scale": self.logit_scale.exp(), "logit_bias": self.logit_bias}


class PromptLearningMethod(AdaptationMethod):
    """Shared behaviour of CoOp, CoCoOp and MaPLe: frozen towers, cross-entropy over classes,
    evaluation with the learned prompts."""

    needs_vision_prompts: ClassVar[bool] = False

    def build_learner(self, text_encoder: PromptTextEncoder, vision_encoder: PromptVisionEncoder | None,
                      class_names: list[str], backbone: Backbone) -> PromptLearner:
        raise NotImplementedError

    def apply(self, model: Backbone, task: TaskInfo | None = None) -> Backbone:
        if isinstance(model, PromptedBackbone):
            raise ValueError(f"method {self.cfg.name!r}: the model already has learned prompts")
        class_names = list(task.class_names) if task is not None else []
        if not class_names:
            raise ValueError(f"method {self.cfg.name!r} learns prompts for classes, but the training data has no "
                             "class names: give data.train a label_key (or use a labelled format such as class "
                             "folders) so each image has a class")
        duplicates = sorted({name for name in class_names if class_names.count(name) > 1})
        if duplicates:
            raise ValueError(f"method {self.cfg.name!r}: class names must be distinct, {duplicates} repeat")
        text_encoder = model.prompt_text_encoder(self.cfg.name)
        vision_encoder = model.prompt_vision_encoder(self.cfg.name) if self.needs_vision_prompts else None
        for param in model.parameters():
            param.requires_grad_(False)
        learner = self.build_learner(text_encoder, vision_encoder, class_names, model)
        learner.to(model.device)
        learner.layout(text_encoder, class_names, model.device)  # a prompt too long fails here, not mid-run
        return PromptedBackbone(model, learner, text_encoder, vision_encoder)

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], loss_fn: nn.Module) -> torch.Tensor:
        """Cross-entropy of the learned-prompt logits against the batch's class labels (CoOp's
        objective; the recipe's contrastive ``loss`` is not used). Label -1 = unlabelled, skipped."""
        labels = batch["labels"]
        if labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(f"method {self.cfg.name!r} trains on single-label classes: labels must be integer "
                             f"class indices of shape (B,), got {labels.dtype} of shape {tuple(labels.shape)}")
        out = model(batch["images"], classify=True)
        logits = out["class_logits"]
        labels = labels.to(logits.device)
        if (labels >= logits.shape[1]).any() or (labels < -1).any():
            bad = labels[(labels >= logits.shape[1]) | (labels < -1)][0].item()
            raise ValueError(f"method {self.cfg.name!r}: label {bad} is not one of the {logits.shape[1]} training "
                             "classes (or -1 for no label)")
        labelled = labels >= 0
        if not labelled.any():
            return logits.sum() * 0.0  # keeps every process's backward in step under DDP
        return F.cross_entropy(logits[labelled].float(), labels[labelled])

    def logits_fn(self, model: Backbone, class_names: list[str], templates: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Classify normalised image features with the learned prompts of ``class_names``
        (the templates are not used: the learned context replaces them)."""
        if not isinstance(model, PromptedBackbone):
            raise ValueError(f"method {self.cfg.name!r}: logits_fn needs the model returned by apply(), got "
                             f"{type(model).__name__}")
        class_names = list(class_names)
        device = model.device
        if model.prompt_learner.conditioned_on_image:
            chunk = max(1, EVAL_PROMPTS_PER_CHUNK // len(class_names))

            def image_conditioned_logits(features: torch.Tensor) -> torch.Tensor:
                with eval_mode(model):
                    parts = [model.class_logits(part.to(device), class_names).float().cpu()
                             for part in features.split(chunk)]
                return torch.cat(parts) if parts else torch.empty(0, len(class_names))

            return image_conditioned_logits
        with eval_mode(model):
            text = model.class_text_features(class_names).float().cpu()
            scale = model.logit_scale.exp().float().cpu()

        def prompt_logits(features: torch.Tensor) -> torch.Tensor:
            return scale * features.float() @ text.T

        return prompt_logits

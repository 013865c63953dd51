"""Adaptation methods: what to train and what to save, plugged into the one training loop.

A method is a config dataclass plus an :class:`AdaptationMethod` subclass, registered in one line
with :func:`register_method`. The loop asks a method to prepare the backbone (freeze, inject
adapters or prompts), for its optimizer parameter groups, and for the state to save: a method
saves only what it trains.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..backbones.base import Backbone
from ..config import TaggedConfig, register_tagged
from ..losses import loss_inputs


@dataclass
class MethodConfig(TaggedConfig):
    """Base of every method's config section; ``name`` picks the method."""

    TAG: ClassVar[str] = "name"
    name: str = "full"


METHODS: dict[str, type["AdaptationMethod"]] = {}


@dataclass
class TaskInfo:
    """What a method may know about the training task before it prepares the model.

    Attributes:
        class_names: natural-language names of the training classes, in label order (empty for
            caption data); prompt-learning and classifier methods build on them.
        templates: the prompt templates of the training data ("a photo of a {}.").
    """

    class_names: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)


def register_method(name: str, config_class: type[MethodConfig]) -> Callable[[type["AdaptationMethod"]], type["AdaptationMethod"]]:
    """Class decorator: make ``method: {name: NAME}`` build this method with ``config_class``."""

    def decorator(cls: type[AdaptationMethod]) -> type[AdaptationMethod]:
        register_tagged(MethodConfig, name)(config_class)
        METHODS[name] = cls
        cls.config_class = config_class
        return cls

    return decorator


def build_method(cfg: MethodConfig) -> "AdaptationMethod":
    if cfg.name not in METHODS:
        close = difflib.get_close_matches(cfg.name, list(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"method.name {cfg.name!r} is not a method{hint} (valid: {sorted(METHODS)})")
    return METHODS[cfg.name](cfg)


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Norm weights, biases, embeddings' 1-d tokens and the logit scale/bias get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "logit_scale" in name or "logit_bias" in name


def forward_for_loss(model: nn.Module, batch: dict[str, Any], loss_fn: nn.Module) -> dict[str, Any]:
    """The model's forward on a training batch, with token features only when ``loss_fn`` needs them."""
    extra = {"with_tokens": True} if getattr(loss_fn, "needs_tokens", False) else {}
    return model(batch["images"], batch.get("tokens"), batch.get("text_features"), **extra)


def contrastive_loss(outputs: dict[str, Any], batch: dict[str, Any], loss_fn: nn.Module) -> torch.Tensor:
    """``loss_fn`` on a forward's outputs (plus token features for token-level losses)."""
    args, kwargs = loss_inputs(outputs, batch["labels"], loss_fn)
    return loss_fn(*args, **kwargs)


class AdaptationMethod:
    """Default behaviour: train whatever ``apply`` leaves with ``requires_grad``.

    Hooks a method may override, all called by the one training loop:

    - ``apply(model, task)``: freeze, inject adapters or prompts; return the model to train.
    - ``compute_loss(model, batch, loss_fn)``: the training objective of one batch (default: the
      recipe's contrastive loss between the batch's images and captions).
    - ``fits_in_closed_form`` + ``fit(model, loader, task)``: methods that need no SGD (a linear
      probe solved by logistic regression, a training-free Tip-Adapter cache) are fitted once
      instead of running optimizer steps.
    - ``prepare_data(model, loader)``: called once the training loader exists, before the
      optimizer is built (a frozen-feature method encodes the training set into the feature cache
      here); returns the (path, reason) of images it could not read. ``reads_cached_features``
      then tells the loop to stop decoding images the method never looks at.
    - ``logits_fn(model, class_names, templates)``: a classifier of its own for zero-shot
      evaluation (learned prompts, a probe, a cache); ``None`` keeps the prompt ensemble.
    - ``plain_backbone(model)``: the trained model as a plain backbone for full-format exports
      (None: the method's parts live outside the backbone; export it with ``--format adapter``);
    - ``trainable_state`` / ``load_trainable_state``: what is saved (only what the method trains);
      ``save_artifacts``: extra files for the run's ``model/`` folder (LoRA's merged weights).
    """

    config_class: ClassVar[type[MethodConfig]]
    fits_in_closed_form: ClassVar[bool] = False
    # WiSE-FT: whether the trained state has a counterpart in the untrained base to interpolate
    # with (a probe or cache fitted from data has none)
    interpolates_with_base: ClassVar[bool] = True
    # parameters used only while training (left out of WiSE-FT's interpolation)
    training_only_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        # the training epoch of the batch being passed to compute_loss, set by the loop (restored on
        # resume): per-item randomness seeded from (epoch, dataset index) resumes exactly
        self.epoch = 0

    def apply(self, model: Backbone, task: TaskInfo | None = None) -> Backbone:
        """Prepare ``model`` for training (freeze, wrap, inject) and return it."""
        return model

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], loss_fn: nn.Module) -> torch.Tensor:
        """Contrastive loss of the batch's images against its captions.

        ``batch["text_features"]`` is set by the loop when the text tower is frozen (cached).
        """
        return contrastive_loss(forward_for_loss(model, batch, loss_fn), batch, loss_fn)

    @property
    def supports_token_losses(self) -> bool:
        """Whether ``compute_loss`` gives a token-level loss (``loss_fn.needs_tokens``, e.g. FILIP) its tokens.

        True for the default objective; a method with its own ``compute_loss`` says so itself.
        """
        return type(self).compute_loss is AdaptationMethod.compute_loss

    def prepare_data(self, model: Backbone, loader: Any) -> list[tuple[str, str]]:
        """One-off work on the training data before SGD; returns unreadable (path, reason) items."""
        return []

    @property
    def reads_cached_features(self) -> bool:
        """True when ``compute_loss`` does not read ``batch["images"]`` (image features from a cache,
        or none at all, as in text-only teacher learning): the loop then skips decoding images."""
        return False

    def fit(self, model: Backbone, loader: Any, task: TaskInfo) -> dict[str, Any]:
        """Closed-form fitting for methods with ``fits_in_closed_form``; returns a summary."""
        raise NotImplementedError(f"method {self.cfg.name!r} trains with SGD, it has no closed-form fit")

    def covers_classes(self, class_names: list[str]) -> bool:
        """Whether ``logits_fn`` can classify these classes (False: a probe or cache fitted on others).

        A retention task outside the method's classes is then scored with the prompt ensemble of
        the (unchanged) towers instead.
        """
        return True

    def logits_fn(self, model: Backbone, class_names: list[str], templates: list[str]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Class logits from normalised image features (on the CPU), or None for the prompt ensemble."""
        return None

    def lr_scale(self, model: Backbone, name: str) -> float:
        """Learning-rate multiplier for parameter ``name`` (layer-wise decay hooks in here)."""
        return 1.0

    def param_groups(self, model: Backbone, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups of the trainable parameters, split by weight decay and lr scale."""
        groups: dict[tuple[float, float], list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            decay = 0.0 if is_no_decay(name, param) else weight_decay
            groups.setdefault((decay, self.lr_scale(model, name)), []).append(param)
        if not groups:
            raise ValueError(f"method {self.cfg.name!r} left no trainable parameters")
        return [{"params": params, "weight_decay": decay, "lr": lr * scale}
                for (decay, scale), params in sorted(groups.items(), key=lambda kv: kv[0])]

    def plain_backbone(self, model: Backbone) -> Backbone | None:
        """The trained model as a plain backbone for full-format exports (open_clip, hf, dual
        encoder), or None when the method adds parts outside the backbone weights (prompts, heads,
        caches) that such formats cannot hold; ``model`` may be changed in place."""
        return None

    def save_artifacts(self, model: Backbone, folder: Any) -> list[Any]:
        """Extra files a method writes into the run's ``model/`` folder (e.g. merged weights)."""
        return []

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint of this method holds: the parameters it trains."""
        return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> None:
        own = dict(model.named_parameters())
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise KeyError(f"{source or 'checkpoint'}: {len(unknown)} keys are not parameters of this model, e.g. {unknown[:3]}")
        with torch.no_grad():
            for name, value in state.items():
                if own[name].shape != value.shape:
                    raise ValueError(f"{source or 'checkpoint'}: {name} has shape {tuple(value.shape)}, model expects {tuple(own[name].shape)}")
                own[name].copy_(value)

    def trainable_parameter_count(self, model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

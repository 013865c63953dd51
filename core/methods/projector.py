"""Projector-only alignment: both towers frozen, only projection heads trained contrastively.

The recipe of "From Unimodal to Multimodal: Scaling up Projectors to Align Modalities"
(Maniparambil et al., 2024): frozen unimodal encoders, small projectors trained with the CLIP
objective. Two placements:

* ``output`` (any backbone): new heads on top of each tower's output embedding. With
  ``init=identity`` the model starts exactly as the base model (same zero-shot accuracy) and
  training moves away from it only as far as the data asks.
* ``projections`` (dual encoder only): re-train the dual encoder's own ``image_projection`` and
  ``text_projection`` on the frozen vision trunk and text encoder, starting from their current
  weights. This is the paper's setting exactly (projectors between two unimodal encoders).

With ``cache_features`` the frozen towers run once per item: the training images' features come
from the :class:`~domainclip.core.features.FeatureCache` by ``batch["indices"]`` and every
caption's features by its text, so later epochs (and later runs) never touch the towers. Cached
image features come from the deterministic evaluation transform: random crops of the training
loader are not seen. Set ``cache_features: false`` for augmentation (the towers then run, without
gradients, on every batch).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone, Tokens
from ..features import FeatureCache, FrozenBackboneWrapper
from .base import AdaptationMethod, MethodConfig, TaskInfo, register_method

log = logging.getLogger("domainclip.methods")

PLACEMENTS = ("output", "projections")
HEADS = ("linear", "mlp")
INITS = ("identity", "random")


@dataclass
class ProjectorConfig(MethodConfig):
    """Freeze both towers and train projection heads on their outputs (projector-only alignment).

    Attributes:
        placement: ``output`` adds new heads on each tower's output embedding (any backbone);
            ``projections`` re-trains a dual encoder's own ``image_projection`` /
            ``text_projection`` on its frozen trunks (the paper's setting; ``head``,
            ``hidden_dim``, ``embed_dim`` and ``init`` then stay at their defaults).
        head: ``linear`` (one matrix, no bias) or ``mlp`` (Linear-GELU-Linear).
        hidden_dim: width of the MLP's hidden layer (0 = the larger of input and output width).
        embed_dim: output width of both heads (0 = the towers' embedding width).
        init: ``identity`` starts the heads as the identity map so training starts from the
            base model (linear: identity matrix, or its leading block when widths differ; mlp:
            residual ``x + MLP(x)`` with a zero last layer, needs equal widths); ``random``:
            PyTorch's default initialisation (mlp without the residual).
        train_logit_scale: learn the temperature (initialised from the base model's).
        cache_features: read the frozen towers' features from the feature cache instead of
            recomputing them every epoch (no augmentation of the cached images).
        cache_dir: feature cache folder ("" = ``$DOMAINCLIP_CACHE`` or ``~/.cache/domainclip/features``).
    """

    name: str = "projector"
    placement: str = "output"
    head: str = "linear"
    hidden_dim: int = 0
    embed_dim: int = 0
    init: str = "identity"
    train_logit_scale: bool = True
    cache_features: bool = True
    cache_dir: str = ""

    def __post_init__(self) -> None:
        for key, valid in (("placement", PLACEMENTS), ("head", HEADS), ("init", INITS)):
            if getattr(self, key) not in valid:
                raise ValueError(f"method.{key} must be one of {valid}, got {getattr(self, key)!r}")
        for key in ("hidden_dim", "embed_dim"):
            if getattr(self, key) < 0:
                raise ValueError(f"method.{key} must be >= 0, got {getattr(self, key)}")
        if self.placement == "projections":
            changed = [key for key, default in (("head", "linear"), ("hidden_dim", 0), ("embed_dim", 0),
                                                ("init", "identity")) if getattr(self, key) != default]
            if changed:
                raise ValueError(f"method.{changed[0]} applies to placement=output only; placement=projections "
                                 f"re-trains the dual encoder's own heads (set model.projection for their shape)")


def build_head(kind: str, in_dim: int, out_dim: int, hidden_dim: int, init: str) -> nn.Module:
    """A projection head ``in_dim -> out_dim`` (see ``ProjectorConfig`` for the options)."""
    if kind == "linear":
        head = nn.Linear(in_dim, out_dim, bias=False)
        if init == "identity":
            nn.init.eye_(head.weight)
        return head
    hidden = hidden_dim or max(in_dim, out_dim)
    if init == "identity":
        if in_dim != out_dim:
            raise ValueError(f"method.init=identity with head=mlp needs equal input and output widths "
                             f"(a residual MLP), got {in_dim} -> {out_dim}; set method.embed_dim=0 or init=random")
        return ResidualMLP(in_dim, hidden)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class ResidualMLP(nn.Module):
    """``x + W2 GELU(W1 x + b1) + b2`` with ``W2 = 0, b2 = 0`` at start: exactly the identity."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class ProjectorModel(FrozenBackboneWrapper):
    """A frozen backbone with trainable heads on its towers' outputs (or its own heads re-trained).

    ``forward`` also takes the frozen towers' outputs directly (``image_inputs``,
    ``text_inputs``: cached features, unnormalised) so a cached training step runs only the heads.
    """

    def __init__(self, base: Backbone, cfg: ProjectorConfig):
        super().__init__(base)
        self.placement = cfg.placement
        if cfg.placement == "projections":
            heads = [getattr(base, name, None) for name in ("image_projection", "text_projection")]
            if not all(isinstance(head, nn.Module) for head in heads):
                raise ValueError(f"method.placement=projections re-trains a dual encoder's image_projection and "
                                 f"text_projection; model.kind={base.kind!r} has none (use placement=output)")
            for head in heads:
                head.requires_grad_(True)
            if not any(p.requires_grad for head in heads for p in head.parameters()):
                raise ValueError("method.placement=projections: the dual encoder's heads have no parameters "
                                 "(model.projection=identity?); use placement=output")
        else:
            width = base.embed_dim
            out_dim = cfg.embed_dim or width
            self.image_head = build_head(cfg.head, width, out_dim, cfg.hidden_dim, cfg.init)
            self.text_head = build_head(cfg.head, width, out_dim, cfg.hidden_dim, cfg.init)
            self._out_dim = out_dim
            self.tower_prefixes = {"image": (*self.tower_prefixes["image"], "image_head."),
                                   "text": (*self.tower_prefixes["text"], "text_head.")}
        self.logit_scale = nn.Parameter(base.logit_scale.detach().clone().float(),
                                        requires_grad=cfg.train_logit_scale)
        bias = base.logit_bias  # SigLIP; registered under its own name (Backbone.logit_bias is a class attribute)
        self.learned_logit_bias = (nn.Parameter(bias.detach().clone().float(), requires_grad=cfg.train_logit_scale)
                                   if bias is not None else None)

    @property
    def logit_bias(self) -> nn.Parameter | None:  # type: ignore[override]
        return self.learned_logit_bias

    # the heads, whichever placement -----------------------------------------------------------
    def image_projection_head(self) -> nn.Module:
        return self.base.image_projection if self.placement == "projections" else self.image_head

    def text_projection_head(self) -> nn.Module:
        return self.base.text_projection if self.placement == "projections" else self.text_head

    @property
    def feature_output(self) -> str:
        """Which frozen output the heads read: the tower embedding or the dual encoder's trunk."""
        return "trunk" if self.placement == "projections" else "embedding"

    @property
    def embed_dim(self) -> int:
        return self.base.embed_dim if self.placement == "projections" else self._out_dim

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.placement == "projections":
            return self.base.encode_image(images, normalize=False)
        with torch.no_grad():
            frozen = self.base.encode_image(images, normalize=False)
        return self.image_head(frozen)

    def _text_features(self, tokens: Tokens) -> torch.Tensor:
        if self.placement == "projections":
            return self.base.encode_text(tokens, normalize=False)
        with torch.no_grad():
            frozen = self.base.encode_text(tokens, normalize=False)
        return self.text_head(frozen)

    def forward(self, images: torch.Tensor | None, tokens: Tokens | None, text_features: torch.Tensor | None = None,
                *, image_inputs: torch.Tensor | None = None, text_inputs: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor | None]:
        """Normalised features of both sides; ``*_inputs`` are frozen tower outputs (cached)."""
        if image_inputs is not None:
            image = F.normalize(self.image_projection_head()(image_inputs), dim=-1)
        else:
            image = self.encode_image(images)
        if text_inputs is not None:
            text = F.normalize(self.text_projection_head()(text_inputs), dim=-1)
        elif text_features is not None:
            text = F.normalize(text_features, dim=-1)
        else:
            text = self.encode_text(tokens)
        return {"image_features": image, "text_features": text, "logit_scale": self.logit_scale.exp(),
                "logit_bias": self.logit_bias}

    def config_dict(self) -> dict[str, Any]:
        return {**self.base.config_dict(), "projector": {"placement": self.placement, "embed_dim": self.embed_dim}}


@dataclass
class _CachedTrainingFeatures:
    """Frozen features of one training set: image rows by dataset index, text rows by caption."""

    images: torch.Tensor
    present: torch.Tensor
    text_rows: dict[str, int]
    texts: torch.Tensor
    dataset_size: int


@register_method("projector", ProjectorConfig)
class Projector(AdaptationMethod):
    """Projector-only alignment; see the module docstring."""

    cfg: ProjectorConfig

    def __init__(self, cfg: ProjectorConfig):
        super().__init__(cfg)
        self.cached: _CachedTrainingFeatures | None = None
        self.skipped_rows = 0

    def apply(self, model: Backbone, task: TaskInfo | None = None) -> Backbone:
        return ProjectorModel(model, self.cfg)

    def prepare_data(self, model: ProjectorModel, loader: Any) -> list[tuple[str, str]]:
        """Cache the frozen features of the training set once (loop hook, before training).

        Returns the (path, reason) of training images that could not be read. Without
        ``cache_features``, or for a stream without a length, does nothing.
        """
        if not self.cfg.cache_features:
            return []
        dataset = getattr(loader, "dataset", loader)
        records = getattr(dataset, "records", None)
        if records is None:
            log.warning("method projector: the training data (%s) has no records (a stream?); the frozen towers "
                        "will run on every batch instead of using the feature cache", type(dataset).__name__)
            return []
        base = _unwrap(model).base
        cache = FeatureCache(self.cfg.cache_dir or None)
        output = _unwrap(model).feature_output
        batch_size = getattr(loader, "batch_size", None) or 64
        images = cache.image_features(base, records, batch_size=batch_size,
                                      num_workers=getattr(loader, "num_workers", 0), normalize=False, output=output)
        table, present = images.dense(len(records))
        captions = list(dict.fromkeys(caption for record in records for caption in record.captions))
        texts = cache.text_features(base, captions, normalize=False, output=output) if captions else torch.zeros(0, 0)
        self.cached = _CachedTrainingFeatures(table, present, {c: i for i, c in enumerate(captions)}, texts,
                                              len(records))
        log.info("method projector: cached features of %d images (%d encoded, %d read back, %d bad) and %d captions",
                 len(records), images.computed, images.reused, len(images.bad), len(captions))
        return images.bad

    @property
    def reads_cached_features(self) -> bool:
        return self.cached is not None

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], loss_fn: nn.Module) -> torch.Tensor:
        """Contrastive loss through the heads only; frozen outputs from the cache when prepared."""
        if self.cached is None:
            return super().compute_loss(model, batch, loss_fn)
        cached = self._cached_on(_unwrap(model).logit_scale.device)
        indices = batch["indices"].to(cached.present.device)
        keep = cached.present[indices]
        if not bool(keep.all()):
            self.skipped_rows += int((~keep).sum())  # unreadable at caching time, listed by prepare_data
        rows = torch.nonzero(keep).flatten()
        image_inputs = cached.images[indices[rows]]
        text_inputs = self._caption_features(model, [batch["captions"][i] for i in rows.tolist()])
        labels = batch["labels"][rows.to(batch["labels"].device)]
        out = model(None, None, image_inputs=image_inputs, text_inputs=text_inputs)
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"],
                       labels=labels)

    def _cached_on(self, device: torch.device) -> _CachedTrainingFeatures:
        """The cached tables, moved to the training device once."""
        cached = self.cached
        if cached.images.device != device:
            cached.images, cached.present, cached.texts = (cached.images.to(device), cached.present.to(device),
                                                           cached.texts.to(device))
        return cached

    def _caption_features(self, model: nn.Module, captions: list[str]) -> torch.Tensor:
        cached = self.cached
        unknown = [c for c in captions if c not in cached.text_rows]
        if unknown:  # a caption the records did not list (should not happen): encode and remember it
            unwrapped = _unwrap(model)
            extra = FeatureCache(self.cfg.cache_dir or None).text_features(
                unwrapped.base, list(dict.fromkeys(unknown)), normalize=False, output=unwrapped.feature_output)
            for caption in dict.fromkeys(unknown):
                cached.text_rows[caption] = len(cached.text_rows)
            extra = extra.to(cached.texts.device)
            cached.texts = torch.cat([cached.texts, extra]) if cached.texts.numel() else extra
        return cached.texts[[cached.text_rows[c] for c in captions]]


def _unwrap(model: nn.Module) -> ProjectorModel:
    """The ``ProjectorModel`` inside a DDP/compiled wrapper."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, ProjectorModel):
        raise TypeError(f"method projector expects the model its apply() returned, got {type(inner).__name__}")
    return inner

"""Tip-Adapter (training-free cache model) and Tip-Adapter-F (cache keys fine-tuned).

Zhang et al., "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification" (ECCV
2022). The few-shot training images become a key-value cache: keys ``K`` (N, D) are their
normalised image features, values ``V`` (N, C) their one-hot labels. For a normalised test
feature ``f`` the logits are::

    logits = 100 * f @ W_zs  +  alpha * exp(-beta * (1 - f @ K.T)) @ V

with ``W_zs`` the zero-shot prompt classifier (D, C) of the frozen text tower. Tip-Adapter-F
makes ``K`` a trainable linear layer (initialised with the features) and trains it with
cross-entropy; here that runs in the one training loop through ``compute_loss`` on cached
features (``train.epochs``/``train.lr`` set the schedule: the paper uses 20 epochs, lr 1e-3,
AdamW). Values, alpha and beta stay fixed.

``search`` picks alpha and beta on a held-out split of the training data (stratified by
``seed``; the paper searches on a separate validation set): the cache is built from the rest,
the grid point with the best accuracy wins (ties: the earlier point), then the final cache holds
every training image. With ``finetune`` the search runs once before training.
The state saved is the cache (keys, values) and alpha, beta.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone, Tokens
from ..eval.zeroshot import ZEROSHOT_LOGIT_SCALE, class_prompts
from ..features import FeatureCache, FrozenBackboneWrapper
from .base import AdaptationMethod, MethodConfig, TaskInfo, register_method
from .linear_probe import single_labels, stratified_split

log = logging.getLogger("domainclip.methods")

STATE_KEYS = ("cache_keys", "cache_values", "alpha", "beta")


@dataclass
class TipAdapterConfig(MethodConfig):
    """Tip-Adapter's training-free cache model of the training images, optionally fine-tuned (-F).

    Attributes:
        alpha: weight of the cache logits against the zero-shot logits.
        beta: sharpness of the affinity ``exp(-beta * (1 - cosine))``.
        search: choose alpha and beta on a held-out part of the training data instead.
        alpha_grid: alpha values tried by ``search``.
        beta_grid: beta values tried by ``search``.
        val_fraction: share of each class held out for ``search``.
        seed: seed of the held-out split.
        finetune: Tip-Adapter-F: train the cache keys with cross-entropy in the training loop
            (``train.epochs``, ``train.lr``); otherwise the cache is fitted once, training-free.
        cache_dir: feature cache folder ("" = ``$DOMAINCLIP_CACHE`` or ``~/.cache/domainclip/features``).
    """

    name: str = "tip_adapter"
    alpha: float = 1.0
    beta: float = 5.5
    search: bool = False
    alpha_grid: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0])
    beta_grid: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 3.0, 4.0, 5.5, 7.0, 9.0, 12.0])
    val_fraction: float = 0.2
    seed: int = 0
    finetune: bool = False
    cache_dir: str = ""

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"method.alpha and method.beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
        if self.search:
            if not self.alpha_grid or not self.beta_grid:
                raise ValueError("method.search needs non-empty method.alpha_grid and method.beta_grid")
            if not 0.0 < self.val_fraction < 1.0:
                raise ValueError(f"method.search needs method.val_fraction in (0, 1), got {self.val_fraction}")


def cached_zeroshot_classifier(cache: FeatureCache, model: Backbone, class_names: list[str],
                               templates: list[str]) -> torch.Tensor:
    """The zero-shot prompt classifier (D, C), as ``build_zeroshot_classifier`` computes it, from
    prompt features read from (or added to) the feature cache: the text tower runs once per prompt."""
    prompts = class_prompts(class_names, templates)
    features = cache.text_features(model, [prompt for group in prompts for prompt in group], normalize=True)
    owner = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor([len(group) for group in prompts]))
    sums = torch.zeros(len(prompts), features.shape[1]).index_add_(0, owner, features)
    return F.normalize(sums, dim=-1).T.contiguous()


def tip_logits(features: torch.Tensor, zeroshot_weights: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               alpha: torch.Tensor | float, beta: torch.Tensor | float) -> torch.Tensor:
    """Tip-Adapter logits of normalised ``features`` (B, D); see the module docstring."""
    affinity = features @ keys.T
    cache_logits = torch.exp(-beta * (1.0 - affinity)) @ values
    return ZEROSHOT_LOGIT_SCALE * features @ zeroshot_weights + alpha * cache_logits


class TipAdapterModel(FrozenBackboneWrapper):
    """The frozen backbone plus the cache: ``cache_keys`` (a parameter, trained by -F), values,
    alpha and beta (buffers), and the zero-shot classifier of the training classes (not saved)."""

    def __init__(self, base: Backbone, finetune: bool):
        super().__init__(base)
        width = base.embed_dim
        self.cache_keys = nn.Parameter(torch.zeros(0, width), requires_grad=finetune)
        self.register_buffer("cache_values", torch.zeros(0, 0))
        self.register_buffer("alpha", torch.tensor(1.0))
        self.register_buffer("beta", torch.tensor(1.0))
        self.register_buffer("zeroshot_weights", torch.zeros(width, 0), persistent=False)

    @property
    def logit_scale(self) -> nn.Parameter:  # type: ignore[override]
        return self.base.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:  # type: ignore[override]
        return self.base.logit_bias

    def set_cache(self, keys: torch.Tensor, values: torch.Tensor, alpha: float | torch.Tensor,
                  beta: float | torch.Tensor) -> None:
        """Replace the cache (shapes may change; call before building an optimizer)."""
        device = self.alpha.device
        trainable = self.cache_keys.requires_grad
        self.cache_keys = nn.Parameter(keys.detach().float().clone().to(device), requires_grad=trainable)
        self.cache_values = values.detach().float().clone().to(device)
        self.alpha = torch.as_tensor(alpha, dtype=torch.float32).clone().to(device)
        self.beta = torch.as_tensor(beta, dtype=torch.float32).clone().to(device)

    def forward(self, images: torch.Tensor | None, tokens: Tokens | None = None,
                text_features: torch.Tensor | None = None, *, image_features: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor | None]:
        """With ``image_features`` (normalised, cached): ``{"logits"}`` of the adapter; else the
        base model's contrastive outputs."""
        if image_features is None:
            return self.base(images, tokens, text_features)
        return {"logits": tip_logits(image_features, self.zeroshot_weights, self.cache_keys, self.cache_values,
                                     self.alpha, self.beta)}


@register_method("tip_adapter", TipAdapterConfig)
class TipAdapter(AdaptationMethod):
    """Training-free Tip-Adapter (closed-form fit) or Tip-Adapter-F (cache keys trained in the loop)."""

    cfg: TipAdapterConfig
    interpolates_with_base = False  # the cache is built from the training data: the base has none

    def __init__(self, cfg: TipAdapterConfig):
        super().__init__(cfg)
        self.fits_in_closed_form = not cfg.finetune  # instance attribute: -F trains in the loop
        self.task = TaskInfo()
        self.features: torch.Tensor | None = None  # (N, D) normalised training features by dataset index
        self.present: torch.Tensor | None = None

    def apply(self, model: Backbone, task: TaskInfo | None = None) -> Backbone:
        self.task = task or TaskInfo()
        return TipAdapterModel(model, self.cfg.finetune)

    # --- building the cache ------------------------------------------------------------------
    def fit(self, model: TipAdapterModel, loader: Any, task: TaskInfo) -> dict[str, Any]:
        """Training-free Tip-Adapter: build the cache (and search alpha, beta) from the training set."""
        self.task = task
        summary, _ = self._build_cache(_unwrap(model), loader)
        return summary

    def prepare_data(self, model: TipAdapterModel, loader: Any) -> list[tuple[str, str]]:
        """Tip-Adapter-F: build the cache to fine-tune (loop hook, before the optimizer is built)."""
        summary, bad = self._build_cache(_unwrap(model), loader)
        log.info("method tip_adapter: cache of %d images for fine-tuning: %s", summary["n_cache"], summary)
        return bad

    def _build_cache(self, model: TipAdapterModel, loader: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        records = getattr(getattr(loader, "dataset", loader), "records", None)
        if records is None:
            raise ValueError("method tip_adapter builds its cache from a data set with records; "
                             "data.train.format=webdataset streams have none")
        class_names = list(self.task.class_names)
        if not class_names or not self.task.templates:
            raise ValueError("method tip_adapter needs labelled training data (data.train.label_key) and prompt "
                             "templates (data.train.templates) for its zero-shot part")
        started = time.perf_counter()
        cache = FeatureCache(self.cfg.cache_dir or None)
        encoded = cache.image_features(
            model.base, records, batch_size=getattr(loader, "batch_size", None) or 64,
            num_workers=getattr(loader, "num_workers", 0), normalize=True)
        features_seconds = time.perf_counter() - started
        labels = single_labels([records[i].label for i in encoded.indices.tolist()], len(class_names), self.cfg.name)
        labelled = torch.from_numpy(labels >= 0)
        keys, label_tensor = encoded.features[labelled], torch.from_numpy(labels)[labelled]
        if not len(keys):
            raise ValueError("method tip_adapter: no labelled, readable training image to build the cache from")
        values = F.one_hot(label_tensor, len(class_names)).float()
        zeroshot = cached_zeroshot_classifier(cache, model.base, class_names, list(self.task.templates))
        model.zeroshot_weights = zeroshot.to(model.alpha.device)
        alpha, beta, search = self.cfg.alpha, self.cfg.beta, {}
        if self.cfg.search:
            alpha, beta, search = self._search(keys, label_tensor, values, zeroshot)
        model.set_cache(keys, values, alpha, beta)
        self.features, self.present = encoded.dense(len(records))
        self.features = F.normalize(self.features, dim=-1)
        summary = {"n_cache": int(len(keys)), "alpha": float(alpha), "beta": float(beta),
                   "n_unlabelled": int((~labelled).sum()), "n_bad": len(encoded.bad), "bad": encoded.bad,
                   "features_computed": encoded.computed, "features_reused": encoded.reused,
                   "zeroshot_train_accuracy": _accuracy(ZEROSHOT_LOGIT_SCALE * keys @ zeroshot, label_tensor),
                   **search, "features_seconds": round(features_seconds, 3),
                   "fit_seconds": round(time.perf_counter() - started - features_seconds, 3)}
        return summary, encoded.bad

    def _search(self, keys: torch.Tensor, labels: torch.Tensor, values: torch.Tensor, zeroshot: torch.Tensor
                ) -> tuple[float, float, dict[str, Any]]:
        """Grid search of alpha and beta: cache = training part, accuracy on the held-out part."""
        train_rows, val_rows = (torch.from_numpy(rows) for rows in
                                stratified_split(labels.numpy(), self.cfg.val_fraction, self.cfg.seed))
        if not len(val_rows) or not len(train_rows):
            raise ValueError(f"method tip_adapter: search with val_fraction={self.cfg.val_fraction} leaves "
                             f"{len(train_rows)} cache and {len(val_rows)} held-out images; use more data")
        best = (-1.0, 0.0, 0.0)
        for beta in self.cfg.beta_grid:
            for alpha in self.cfg.alpha_grid:
                logits = tip_logits(keys[val_rows], zeroshot, keys[train_rows], values[train_rows], alpha, beta)
                accuracy = _accuracy(logits, labels[val_rows])
                if accuracy > best[0]:
                    best = (accuracy, float(alpha), float(beta))
        return best[1], best[2], {"search_val_accuracy": best[0], "n_search_val": int(len(val_rows))}

    # --- Tip-Adapter-F in the training loop ------------------------------------------------------
    @property
    def reads_cached_features(self) -> bool:
        return self.features is not None

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], loss_fn: nn.Module) -> torch.Tensor:
        """Cross-entropy of the adapter's logits on the batch's cached features (-F only)."""
        if self.features is None:
            raise RuntimeError("method tip_adapter with finetune=true needs its cache before training: the loop "
                               "must call method.prepare_data(model, loader) before building the optimizer")
        inner = _unwrap(model)
        device = inner.cache_keys.device
        if self.features.device != device:
            self.features, self.present = self.features.to(device), self.present.to(device)
        indices = batch["indices"].to(device)
        keep = self.present[indices]
        labels = batch["labels"].to(device)[keep]
        logits = model(None, image_features=self.features[indices[keep]])["logits"]
        labelled = labels >= 0
        if not bool(labelled.any()):
            return logits.sum() * 0.0  # nothing to learn from this batch; keeps the graph for DDP
        return F.cross_entropy(logits[labelled], labels[labelled])

    # --- evaluation and state ---------------------------------------------------------------------
    def _values_for(self, class_names: list[str], values: torch.Tensor) -> torch.Tensor:
        """Cache values re-indexed to ``class_names``: a class the cache never saw gets no cache
        logits (it is classified zero-shot, as in the base-to-novel protocol)."""
        trained = list(self.task.class_names)
        if not trained:  # a state loaded without its task: only the same number of classes makes sense
            if len(class_names) != values.shape[1]:
                raise ValueError(f"the Tip-Adapter cache holds {values.shape[1]} classes; the evaluation data has "
                                 f"{len(class_names)} ({class_names[:5]}...)")
            return values
        mapped = torch.zeros(values.shape[0], len(class_names))
        for column, name in enumerate(class_names):
            if name in trained:
                mapped[:, column] = values[:, trained.index(name)]
        return mapped

    def covers_classes(self, class_names: list[str]) -> bool:
        return not self.task.class_names or list(class_names) == list(self.task.class_names)

    def logits_fn(self, model: Backbone, class_names: list[str], templates: list[str]
                  ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        inner = _unwrap(model)
        if not inner.cache_keys.shape[0]:
            raise RuntimeError("the Tip-Adapter cache is empty: fit or load a trained state first")
        cache = FeatureCache(self.cfg.cache_dir or None)
        zeroshot = cached_zeroshot_classifier(cache, inner.base, list(class_names), list(templates))
        keys = inner.cache_keys.detach().float().cpu()
        values = self._values_for(list(class_names), inner.cache_values.float().cpu())
        alpha, beta = float(inner.alpha), float(inner.beta)

        def logits(features: torch.Tensor) -> torch.Tensor:
            return tip_logits(features.float(), zeroshot, keys, values, alpha, beta)

        return logits

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        inner = _unwrap(model)
        return {name: getattr(inner, name).detach() for name in STATE_KEYS}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> None:
        where = source or "checkpoint"
        if set(state) != set(STATE_KEYS):
            raise KeyError(f"{where}: a Tip-Adapter state holds exactly {sorted(STATE_KEYS)}, got {sorted(state)}")
        inner = _unwrap(model)
        keys, values = state["cache_keys"], state["cache_values"]
        width = inner.base.embed_dim
        if keys.ndim != 2 or keys.shape[1] != width or values.ndim != 2 or values.shape[0] != keys.shape[0]:
            raise ValueError(f"{where}: cache_keys {tuple(keys.shape)} and cache_values {tuple(values.shape)} do not "
                             f"form an (N, {width}) / (N, classes) cache for this model")
        if inner.cache_keys.shape == keys.shape:  # same cache size: copy in place (optimizer keeps its parameter)
            with torch.no_grad():
                inner.cache_keys.copy_(keys)
                inner.cache_values.copy_(values)
                inner.alpha.copy_(state["alpha"])
                inner.beta.copy_(state["beta"])
        else:
            inner.set_cache(keys, values, state["alpha"], state["beta"])

    def trainable_parameter_count(self, model: nn.Module) -> int:
        inner = _unwrap(model)
        return inner.cache_keys.numel() if self.cfg.finetune else inner.cache_keys.numel() + inner.cache_values.numel()


def _unwrap(model: nn.Module) -> TipAdapterModel:
    inner = getattr(model, "module", model)
    if not isinstance(inner, TipAdapterModel):
        raise TypeError(f"method tip_adapter expects the model its apply() returned, got {type(inner).__name__}")
    return inner


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=-1) == labels).float().mean())

"""Linear probe: logistic regression on frozen image features, regularisation picked on a split.

The CLIP paper's linear-probe protocol: L2-regularised logistic regression (scikit-learn, lbfgs,
multinomial) on the frozen image features, the inverse regularisation strength ``C`` chosen by
accuracy on a validation part of the training data, then refitted on all of it. Features are the
L2-normalised image embeddings (what the evaluation hands to ``logits_fn``), read from the feature
cache so sweeps and re-runs never re-encode the images. The learned ``W`` and ``b`` are the
method's whole state (``probe.weight`` (C, D), ``probe.bias`` (C,) in safetensors).
"""
from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backbones.base import Backbone
from ..features import FeatureCache
from .base import AdaptationMethod, MethodConfig, TaskInfo, register_method

log = logging.getLogger("domainclip.methods")

ABSENT_CLASS_BIAS = -1e4
"""Bias of a class without training examples: the probe never predicts it."""


@dataclass
class LinearProbeConfig(MethodConfig):
    """Logistic regression on frozen image features with a validated regularisation strength.

    Attributes:
        c_values: grid of inverse L2 regularisation strengths ``C`` (scikit-learn's convention:
            larger = weaker regularisation); the one with the best validation accuracy wins, ties
            going to the smaller ``C``.
        val_fraction: share of each class held out (by ``seed``) to choose ``C``; the final probe
            is refitted on all training images. 0 needs a single value in ``c_values``.
        max_iter: lbfgs iterations per fit.
        seed: seed of the stratified validation split.
        fallback_c: the ``C`` used when no validation split is possible (every class has a
            single training image, e.g. 1-shot); the run's summary says so.
        cache_dir: feature cache folder ("" = ``$DOMAINCLIP_CACHE`` or ``~/.cache/domainclip/features``).
    """

    name: str = "linear_probe"
    c_values: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0])
    val_fraction: float = 0.2
    max_iter: int = 1000
    seed: int = 0
    fallback_c: float = 10.0
    cache_dir: str = ""

    def __post_init__(self) -> None:
        if not self.c_values or any(float(c) <= 0 for c in self.c_values):
            raise ValueError(f"method.c_values must be a non-empty list of positive numbers, got {self.c_values}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"method.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction == 0.0 and len(self.c_values) > 1:
            raise ValueError(f"method.val_fraction=0 leaves nothing to choose C on; give one value in "
                             f"method.c_values (got {self.c_values}) or a val_fraction > 0")
        if self.fallback_c <= 0:
            raise ValueError(f"method.fallback_c must be positive, got {self.fallback_c}")
        if self.max_iter < 1:
            raise ValueError(f"method.max_iter must be >= 1, got {self.max_iter}")


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, val) holding out ``round(n_c * val_fraction)`` items of each class c.

    A class with at least two items keeps at least one on each side; a class with one item stays
    in training. Deterministic in ``seed``; both outputs are sorted.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        count = int(round(len(members) * val_fraction))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        else:
            count = 0
        val.extend(members[:count].tolist())
    val_array = np.array(sorted(val), dtype=np.int64)
    train_array = np.setdiff1d(np.arange(len(labels)), val_array)
    return train_array, val_array


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray, c_value: float, max_iter: int,
                            start: Any = None) -> Any:
    """scikit-learn's L2 logistic regression (lbfgs, multinomial for several classes).

    ``start``: a model fitted on the same classes whose solution seeds lbfgs (warm start along a
    regularisation path: same optimum, far fewer iterations). It is refitted in place.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    if start is not None and list(getattr(start, "classes_", [])) == sorted(np.unique(labels).tolist()):
        model = start.set_params(C=float(c_value), warm_start=True)
    else:
        model = LogisticRegression(C=float(c_value), max_iter=max_iter, warm_start=True)
    # One BLAS/OpenMP thread: a probe's matrices are small (images x feature dim), so spinning up a
    # thread team costs more than it saves, and on a busy machine it costs up to 50x (measured).
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(limits=1):
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(features, labels)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("linear probe: lbfgs did not converge in %d iterations for C=%g (raise method.max_iter)",
                    max_iter, c_value)
    return model


def probe_weights(model: Any, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` (num_classes, D) and ``b`` with ``argmax(W f + b)`` = the sklearn model's prediction.

    A binary sklearn model has one row ``w``: logits ``[0, w f + b0]`` give the same softmax.
    Classes absent from training get a zero row and bias ``ABSENT_CLASS_BIAS``.
    """
    coef = torch.as_tensor(model.coef_, dtype=torch.float32)
    intercept = torch.as_tensor(model.intercept_, dtype=torch.float32)
    classes = [int(c) for c in model.classes_]
    if len(classes) == 2 and coef.shape[0] == 1:
        coef = torch.cat([torch.zeros_like(coef), coef])
        intercept = torch.cat([torch.zeros(1), intercept])
    weight = torch.zeros(num_classes, coef.shape[1])
    bias = torch.full((num_classes,), ABSENT_CLASS_BIAS)
    weight[classes] = coef
    bias[classes] = intercept
    return weight, bias


@register_method("linear_probe", LinearProbeConfig)
class LinearProbe(AdaptationMethod):
    """Closed-form fit of a logistic-regression probe on cached frozen features."""

    cfg: LinearProbeConfig
    fits_in_closed_form = True
    interpolates_with_base = False  # the probe is fitted from data: the base has none

    def __init__(self, cfg: LinearProbeConfig):
        super().__init__(cfg)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.class_names: list[str] = []

    def apply(self, model: Backbone, task: TaskInfo | None = None) -> Backbone:
        """Freeze the whole backbone: the probe lives beside it."""
        self.class_names = list(task.class_names) if task is not None else []
        return model.requires_grad_(False)

    def covers_classes(self, class_names: list[str]) -> bool:
        """Every class has probe weights (by name; any order or subset of the fitted classes)."""
        if self.class_names:
            return all(name in self.class_names for name in class_names)
        return self.weight is None or len(class_names) == self.weight.shape[0]

    def fit(self, model: Backbone, loader: Any, task: TaskInfo) -> dict[str, Any]:
        """Encode (or read) the training features, choose ``C`` on a split, refit on everything."""
        dataset = loader.dataset
        num_classes = len(task.class_names)
        if num_classes < 2:
            raise ValueError(f"method linear_probe needs labelled training data with >= 2 classes "
                             f"(data.train.label_key); got class names {task.class_names}")
        started = time.perf_counter()
        cache = FeatureCache(self.cfg.cache_dir or None)
        encoded = cache.image_features(model, dataset.records, batch_size=loader.batch_size or 64,
                                       num_workers=loader.num_workers, normalize=True)
        features_seconds = time.perf_counter() - started
        labels = single_labels([dataset.records[i].label for i in encoded.indices.tolist()], num_classes,
                               self.cfg.name)
        labelled = labels >= 0
        features = encoded.features[torch.from_numpy(labelled)].numpy()
        labels = labels[labelled]
        if len(np.unique(labels)) < 2:
            raise ValueError(f"method linear_probe: the training images hold only classes {np.unique(labels).tolist()}; "
                             f"a probe needs at least two")
        summary, sweep_model = self._choose_c(features, labels)
        final = fit_logistic_regression(features, labels, summary["C"], self.cfg.max_iter, start=sweep_model)
        self.weight, self.bias = probe_weights(final, num_classes)
        summary.update(n_fit=int(len(labels)), n_unlabelled=int((~labelled).sum()), n_bad=len(encoded.bad),
                       bad=encoded.bad, features_computed=encoded.computed, features_reused=encoded.reused,
                       train_accuracy=float((final.predict(features) == labels).mean()),
                       features_seconds=round(features_seconds, 3),
                       fit_seconds=round(time.perf_counter() - started - features_seconds, 3))
        return summary

    def _choose_c(self, features: np.ndarray, labels: np.ndarray) -> tuple[dict[str, Any], Any]:
        """The chosen ``C`` with its validation scores, and the last model of the sweep (a warm start)."""
        c_values = sorted(float(c) for c in self.cfg.c_values)
        if len(c_values) == 1:
            return {"C": c_values[0], "val_accuracy": {}, "n_val": 0}, None
        train_rows, val_rows = stratified_split(labels, self.cfg.val_fraction, self.cfg.seed)
        if len(val_rows) == 0 and np.bincount(labels).max() < 2:
            log.warning("linear probe: every class has one training image, so no C can be validated; "
                        "using method.fallback_c=%g", self.cfg.fallback_c)
            return {"C": float(self.cfg.fallback_c), "val_accuracy": {}, "n_val": 0,
                    "C_choice": "fallback: every class has a single training image"}, None
        if len(val_rows) == 0 or len(np.unique(labels[train_rows])) < 2:
            raise ValueError(f"method linear_probe: a validation split of {self.cfg.val_fraction} leaves "
                             f"{len(val_rows)} validation and {len(train_rows)} training images; "
                             f"use more data, a larger val_fraction, or one value in c_values")
        scores, probe = {}, None
        for c_value in c_values:  # ascending: each fit starts from the more regularised solution
            probe = fit_logistic_regression(features[train_rows], labels[train_rows], c_value, self.cfg.max_iter,
                                            start=probe)
            scores[c_value] = float((probe.predict(features[val_rows]) == labels[val_rows]).mean())
        best = max(c_values, key=lambda c: (scores[c], -c))
        return {"C": best, "val_accuracy": scores, "n_val": int(len(val_rows))}, probe

    def logits_fn(self, model: Backbone, class_names: list[str], templates: list[str]
                  ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        weight, bias = self._require_fitted()
        if not self.covers_classes(class_names):
            fitted = self.class_names or f"{weight.shape[0]} classes"
            unseen = [name for name in class_names if name not in self.class_names] or list(class_names)
            raise ValueError(f"the linear probe was fitted on {fitted}; it has no weights for the evaluation "
                             f"classes {unseen[:5]} (a probe cannot classify classes it never saw)")
        if self.class_names:  # the evaluation's class order (or a subset) picks the probe rows by name
            rows = [self.class_names.index(name) for name in class_names]
            weight, bias = weight[rows], bias[rows]

        def logits(features: torch.Tensor) -> torch.Tensor:
            return features.float() @ weight.T + bias

        return logits

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        weight, bias = self._require_fitted()
        return {"probe.weight": weight, "probe.bias": bias}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> None:
        where = source or "checkpoint"
        expected = {"probe.weight", "probe.bias"}
        if set(state) != expected:
            raise KeyError(f"{where}: a linear probe state holds exactly {sorted(expected)}, got {sorted(state)}")
        weight, bias = state["probe.weight"].float(), state["probe.bias"].float()
        width = getattr(model, "embed_dim", weight.shape[-1])
        if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[1] != width:
            raise ValueError(f"{where}: probe.weight {tuple(weight.shape)} and probe.bias {tuple(bias.shape)} do not "
                             f"form a (classes, {width}) probe for this model")
        self.weight, self.bias = weight.clone(), bias.clone()

    def trainable_parameter_count(self, model: nn.Module) -> int:
        return 0 if self.weight is None else self.weight.numel() + self.bias.numel()

    def _require_fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.weight is None or self.bias is None:
            raise RuntimeError("the linear probe is not fitted yet (run fit() or load a trained state)")
        return self.weight, self.bias


def single_labels(labels: Sequence[Any], num_classes: int, method: str) -> np.ndarray:
    """Integer class labels (-1 = none) checked against the class count of ``method``'s task."""
    if any(not isinstance(label, (int, np.integer)) for label in labels):
        raise ValueError(f"method {method} needs one class label per image; the training data has "
                         f"multi-label vectors")
    array = np.asarray(labels, dtype=np.int64)
    wrong = array[(array < -1) | (array >= num_classes)]
    if len(wrong):
        raise ValueError(f"method {method}: labels {sorted(set(wrong.tolist()))[:5]} are outside 0..{num_classes - 1}")
    return array

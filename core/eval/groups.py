"""Group-level classification metrics from per-image class scores (e.g. CT volumes from slices).

Some data sets hold many images of one object: the axial slices of a CT volume, the tiles of a
slide, the frames of a clip. Each image is classified on its own; :func:`group_metrics` then
turns the images of one group (``ImageTextRecord.group``) into one decision:

* **scores** -- the images' class probabilities (softmax of the task's logits) are aggregated
  per group with :func:`aggregate_scores`: ``max``, ``mean``, ``topk_mean`` (mean of the ``k``
  highest) or ``noisy_or`` (``1 - prod(1 - p)``). With two classes only the probability of the
  second class (e.g. "present") is aggregated, ``s``, and the group's scores are ``[1 - s, s]``:
  the group is called positive when ``s >= 0.5`` and ranked by ``s`` for the AUROC. (Aggregating
  both classes with ``max`` would call every mixed group both.) With more classes each class's
  probability is aggregated and the arg-max is the prediction.
* **label** -- the group's true label from its images' labels (:data:`LABEL_RULES`): ``any``
  (two classes: the second class if any image has it, "present if any slice is present"),
  ``majority`` (the most frequent label, ties to the lower class index) or ``same`` (every image
  must carry the same label, else an error).

Images without a label (-1) are left out. Group ids are only used to group: none is written to
the metrics.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from domainclip.core.eval.metrics import classification_metrics

__all__ = ["AGGREGATIONS", "GroupEvalConfig", "LABEL_RULES", "aggregate_scores", "check_group_rules", "group_label",
           "group_metrics", "group_scores"]

AGGREGATIONS = ("max", "mean", "topk_mean", "noisy_or")
LABEL_RULES = ("any", "majority", "same")
GROUP_METRIC_KEYS = ("auroc", "acc1", "balanced_accuracy", "mean_per_class_recall", "per_class_recall",
                     "confusion_matrix")


def check_group_rules(aggregate: str, label: str, k: int = 3) -> None:
    """Raise a ``ValueError`` listing the valid names when a rule name is unknown (or ``k < 1``)."""
    if aggregate not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregate!r}; valid: {list(AGGREGATIONS)}")
    if label not in LABEL_RULES:
        raise ValueError(f"unknown group label rule {label!r}; valid: {list(LABEL_RULES)}")
    if k < 1:
        raise ValueError(f"topk_mean needs k >= 1, got {k}")


@dataclass
class GroupEvalConfig:
    """Group-level metrics of a zeroshot task, e.g. per CT volume from its slices (core/eval/groups.py).

    Attributes:
        aggregate: how a group's per-image class probabilities become one group score: ``max``,
            ``mean``, ``topk_mean`` (mean of the ``k`` highest) or ``noisy_or`` (1 - prod(1 - p));
            "" = no group metrics. With two classes only the second class's probability is
            aggregated and the group is called positive when it is >= 0.5.
        k: images averaged by ``topk_mean``.
        label: the group's true label from its images' labels: ``any`` (two classes: the second
            class, e.g. "present", if any image has it), ``majority`` (ties to the lower class index)
            or ``same`` (all images must agree).
        name: prefix of the metric keys in ``metrics.json``: ``<name>_acc1``,
            ``<name>_balanced_accuracy``, ``<name>_auroc`` (two classes), ``n_<name>s``...
    """

    aggregate: str = ""
    k: int = 3
    label: str = "any"
    name: str = "group"

    def __post_init__(self) -> None:
        if self.aggregate:
            check_group_rules(self.aggregate, self.label, self.k)
        if not self.name.isidentifier():
            raise ValueError(f"eval groups.name must be a plain name such as 'volume', got {self.name!r}")


def aggregate_scores(scores: np.ndarray | Sequence[float], method: str = "max", k: int = 3) -> float:
    """One group score from its images' scores (probabilities in [0, 1] for ``noisy_or``)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("aggregate_scores got no scores")
    if method == "max":
        return float(values.max())
    if method == "mean":
        return float(values.mean())
    if method == "topk_mean":
        return float(np.sort(values)[-max(1, min(k, values.size)):].mean())
    if method == "noisy_or":
        if values.min() < 0 or values.max() > 1:
            raise ValueError("noisy_or needs probabilities in [0, 1]")
        return float(1.0 - np.prod(1.0 - values))
    raise ValueError(f"unknown aggregation {method!r}; valid: {list(AGGREGATIONS)}")


def group_label(labels: Sequence[int], rule: str, num_classes: int) -> int:
    """The label of one group from its images' labels (module docstring)."""
    values = [int(v) for v in labels]
    if not values:
        raise ValueError("group_label got no labels")
    if rule == "any":
        if num_classes != 2:
            raise ValueError(f"group label rule 'any' needs two classes (e.g. absent / present), got {num_classes}; "
                             "use 'majority' or 'same'")
        return int(1 in values)
    if rule == "majority":
        return int(np.bincount(values, minlength=num_classes).argmax())
    if rule == "same":
        if len(set(values)) != 1:
            raise ValueError(f"group label rule 'same': a group's images carry different labels {sorted(set(values))}; "
                             "use 'any' or 'majority'")
        return values[0]
    raise ValueError(f"unknown group label rule {rule!r}; valid: {list(LABEL_RULES)}")


def group_scores(probabilities: torch.Tensor, labels: torch.Tensor, groups: Sequence[str], aggregate: str = "max",
                 k: int = 3, label_rule: str = "any") -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, C)`` aggregated class scores and ``(G,)`` group labels, groups in first-seen order."""
    check_group_rules(aggregate, label_rule, k)
    if probabilities.ndim != 2 or probabilities.shape[0] != len(groups) or labels.shape != (len(groups),):
        raise ValueError(f"group_scores: {len(groups)} group ids but probabilities of shape "
                         f"{tuple(probabilities.shape)} and labels of shape {tuple(labels.shape)}")
    members: dict[str, list[int]] = {}
    for row, group in enumerate(groups):
        members.setdefault(group, []).append(row)
    probs = probabilities.detach().double().cpu().numpy()
    targets = labels.cpu().tolist()
    num_classes = probs.shape[1]
    scores, group_labels = [], []
    for rows in members.values():
        if num_classes == 2:
            positive = aggregate_scores(probs[rows, 1], aggregate, k)
            scores.append([1.0 - positive, positive])
        else:
            scores.append([aggregate_scores(probs[rows, c], aggregate, k) for c in range(num_classes)])
        group_labels.append(group_label([targets[r] for r in rows], label_rule, num_classes))
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(group_labels, dtype=torch.long)


def group_metrics(logits: torch.Tensor, labels: torch.Tensor, groups: Sequence[str], class_names: list[str],
                  aggregate: str = "max", k: int = 3, label_rule: str = "any", prefix: str = "group") -> dict[str, Any]:
    """Group-level metrics as flat keys ``<prefix>_acc1``, ``<prefix>_balanced_accuracy``,
    ``<prefix>_auroc`` (two classes, both among the groups), ``<prefix>_per_class_recall``,
    ``<prefix>_confusion_matrix``, the rules used, and the count ``n_<prefix>s``.

    ``logits`` (N, C) and ``labels`` (N,) are the labelled images' class logits and labels, and
    ``groups[i]`` the group id of row ``i``.
    """
    if not prefix.isidentifier():
        raise ValueError(f"group metric prefix must be a plain name such as 'volume', got {prefix!r}")
    if any(not group for group in groups):
        raise ValueError(f"{sum(1 for g in groups if not g)} of {len(groups)} images have no group id")
    probabilities = torch.softmax(logits.detach().double(), dim=1)
    scores, targets = group_scores(probabilities, labels, groups, aggregate, k, label_rule)
    if scores.shape[1] == 2:  # positive at s >= 0.5: an exact tie [0.5, 0.5] goes to the positive class
        tie = scores[:, 0] == scores[:, 1]
        scores[tie, 0] -= 1e-6  # above float32 rounding at 0.5, which the metrics compute in
    metrics = classification_metrics(scores, targets, class_names)
    result: dict[str, Any] = {f"{prefix}_{key}": metrics[key] for key in GROUP_METRIC_KEYS if key in metrics}
    result[f"{prefix}_aggregate"] = aggregate if aggregate != "topk_mean" else f"topk_mean (k={k})"
    result[f"{prefix}_label_rule"] = label_rule
    result[f"n_{prefix}s"] = int(targets.numel())
    return result

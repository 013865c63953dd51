"""Zero-shot multi-label classification with positive/negative prompt pairs (CheXzero style).

For each label L the positive prompts ("{}", "signs of {}") and the negative prompts
("no {}", "no signs of {}") are ensembled like a zero-shot classifier (normalised mean of the
prompt features). The probability of L is the softmax over the (positive, negative)
similarities times a logit scale, which equals ``sigmoid(scale * (s_pos - s_neg))``.

AUROC is computed on the log-odds ``scale * (s_pos - s_neg)``: it orders images exactly like the
probability does, but cannot saturate to 0 or 1 in float32 and so creates no artificial ties.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from domainclip.core.eval.metrics import auroc
from domainclip.core.encode import FrozenEncoder
from domainclip.core.eval.zeroshot import (
    ZEROSHOT_LOGIT_SCALE,
    EncodedImages,
    build_zeroshot_classifier,
    describe_sample,
    encode_loader_images,
    unwrap_model,
)

__all__ = [
    "build_multilabel_classifiers",
    "evaluate_multilabel",
    "multilabel_logits",
    "multilabel_probabilities",
]


def build_multilabel_classifiers(
    model: nn.Module | FrozenEncoder,
    label_names: Sequence[str],
    pos_templates: Sequence[str],
    neg_templates: Sequence[str],
    batch_size: int = 256,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive and the negative prompt-ensemble classifiers, each (D, L) on the model's device
    (fp32 weights by default, as ``build_zeroshot_classifier``)."""
    encoder = FrozenEncoder.of(model, precision)
    positive = build_zeroshot_classifier(encoder, label_names, pos_templates, batch_size)
    negative = build_zeroshot_classifier(encoder, label_names, neg_templates, batch_size)
    return positive, negative


def multilabel_logits(
    image_features: torch.Tensor,
    positive_classifier: torch.Tensor,
    negative_classifier: torch.Tensor,
    scale: float = ZEROSHOT_LOGIT_SCALE,
) -> torch.Tensor:
    """Log-odds (N, L) of each label: ``scale * (image @ positive - image @ negative)``."""
    return scale * (image_features @ positive_classifier - image_features @ negative_classifier)


def multilabel_probabilities(
    image_features: torch.Tensor,
    positive_classifier: torch.Tensor,
    negative_classifier: torch.Tensor,
    scale: float = ZEROSHOT_LOGIT_SCALE,
) -> torch.Tensor:
    """Probability (N, L) of each label: softmax over its (positive, negative) scaled similarities."""
    return torch.sigmoid(multilabel_logits(image_features, positive_classifier, negative_classifier, scale))


def evaluate_multilabel(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    label_names: Sequence[str],
    pos_templates: Sequence[str],
    neg_templates: Sequence[str],
    accelerator: Any = None,
    text_batch_size: int = 256,
    precision: str = "auto",
) -> dict[str, Any]:
    """Per-label zero-shot AUROC on a loader whose ``labels`` are FloatTensor (B, L) of 0/1/NaN.

    NaN marks an unknown label: that image is left out of that label's AUROC only. A label whose
    known targets hold only one class has no AUROC: it is reported as ``None`` and left out of
    ``mean_auroc``. ``label_counts`` gives each label's positive, negative and unknown counts;
    items the loader skipped are counted in ``n_bad`` and listed in ``bad``. Images are encoded
    with the weights held in ``precision`` (``core/encode.py``), the prompt classifiers in fp32.
    """
    model = unwrap_model(model, accelerator)
    encoder = FrozenEncoder.of(model, precision)
    label_names = list(label_names)
    if len(set(label_names)) != len(label_names):
        raise ValueError(f"label_names must be unique, got {label_names}")
    positive, negative = build_multilabel_classifiers(model, label_names, pos_templates, neg_templates, text_batch_size)
    encoded = encode_loader_images(encoder, loader, accelerator, need_labels=True)
    targets = _check_multilabel_targets(encoded, label_names)
    log_odds = multilabel_logits(encoded.features, positive.cpu(), negative.cpu())

    per_label: dict[str, float | None] = {}
    counts: dict[str, dict[str, int]] = {}
    for column, name in enumerate(label_names):
        known = ~torch.isnan(targets[:, column])
        label_targets = targets[known, column]
        value = auroc(log_odds[known, column], label_targets)
        per_label[name] = None if math.isnan(value) else value
        n_positive = int((label_targets == 1).sum())
        counts[name] = {
            "positive": n_positive,
            "negative": int(label_targets.numel()) - n_positive,
            "unknown": int((~known).sum()),
        }
    defined = [value for value in per_label.values() if value is not None]
    return {
        "auroc": per_label,
        "mean_auroc": sum(defined) / len(defined) if defined else None,
        "label_counts": counts,
        "n_samples": int(targets.shape[0]),
        "n_bad": len(encoded.bad),
        "bad": [list(item) for item in encoded.bad],
    }


def _check_multilabel_targets(encoded: EncodedImages, label_names: list[str]) -> torch.Tensor:
    num_labels = len(label_names)
    targets = encoded.labels
    if targets.ndim != 2 or targets.shape[1] != num_labels:
        raise ValueError(
            f"evaluate_multilabel needs targets of shape (N, {num_labels}) (one column per label name), "
            f"got {tuple(targets.shape)}"
        )
    targets = targets.float()
    invalid = ~(torch.isnan(targets) | (targets == 0) | (targets == 1))
    if invalid.any():
        row, column = (int(v) for v in invalid.nonzero()[0])
        raise ValueError(
            f"target {targets[row, column].item()} of {describe_sample(encoded, row)} "
            f"for label {label_names[column]!r} is not 0, 1 or NaN (unknown)"
        )
    return targets

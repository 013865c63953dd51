"""Evaluation metrics as pure tensor functions (no model, no data loading).

Names follow LAION's CLIP_benchmark so result files can be compared with published tables:
``acc1``, ``acc5``, ``mean_per_class_recall`` for zero-shot classification and
``image_retrieval_recall@k`` (text -> image) / ``text_retrieval_recall@k`` (image -> text) for
retrieval. All values are fractions in [0, 1], not percentages.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "auroc",
    "classification_metrics",
    "deduplicate_by_index",
    "retrieval_metrics",
]


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------

def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Single-label classification metrics from logits.

    Returns ``acc1``, ``acc5`` (top-min(5, C) accuracy: with fewer than 5 classes it is the
    top-C accuracy, i.e. 1.0, where CLIP_benchmark writes NaN), ``mean_per_class_recall`` and the
    same value under ``balanced_accuracy``, ``per_class_recall`` ({class name: recall}),
    ``confusion_matrix`` (rows = true class, columns = predicted class, as lists of ints) and
    ``n_samples``. With two classes, both present, also ``auroc``: the ranking quality of the
    logit margin of the second class (e.g. "pneumonia" after "normal") over the first.

    A class that never occurs in ``targets`` has no defined recall: it is reported as ``None`` in
    ``per_class_recall`` and left out of the mean (this is what ``sklearn``'s
    ``balanced_accuracy_score`` does too), so the mean is never NaN.
    """
    num_classes = len(class_names)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    if logits.shape[1] != num_classes:
        raise ValueError(f"logits have {logits.shape[1]} columns but {num_classes} class names were given")
    if len(set(class_names)) != num_classes:
        duplicates = sorted({name for name in class_names if class_names.count(name) > 1})
        raise ValueError(f"class_names must be unique, repeated: {duplicates}")
    targets = _check_class_targets(targets, logits.shape[0], num_classes)
    if logits.shape[0] == 0:
        raise ValueError("classification_metrics got no samples (N = 0)")

    logits = logits.detach().float().cpu()
    k = min(5, num_classes)
    top_k = logits.topk(k, dim=1).indices
    hits = top_k == targets[:, None]
    predictions = top_k[:, 0]

    confusion = torch.bincount(targets * num_classes + predictions, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    support = confusion.sum(dim=1)
    correct = confusion.diagonal()
    per_class: dict[str, float | None] = {}
    for name, n_correct, n_true in zip(class_names, correct.tolist(), support.tolist()):
        per_class[name] = n_correct / n_true if n_true > 0 else None
    present = [value for value in per_class.values() if value is not None]
    balanced = sum(present) / len(present)
    extra = {}
    if num_classes == 2 and len(present) == 2:  # binary: AUROC of class 1 against class 0
        extra["auroc"] = auroc(logits[:, 1] - logits[:, 0], targets)
    return {**extra,
        "acc1": hits[:, 0].float().mean().item(),
        "acc5": hits.any(dim=1).float().mean().item(),
        "mean_per_class_recall": balanced,
        "balanced_accuracy": balanced,
        "per_class_recall": per_class,
        "confusion_matrix": confusion.tolist(),
        "n_samples": int(targets.numel()),
    }


def _check_class_targets(targets: torch.Tensor, num_samples: int, num_classes: int) -> torch.Tensor:
    if targets.ndim != 1 or targets.shape[0] != num_samples:
        raise ValueError(f"targets must have shape ({num_samples},) to match the logits, got {tuple(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be integer class indices, got dtype {targets.dtype}")
    targets = targets.detach().long().cpu()
    out_of_range = (targets < 0) | (targets >= num_classes)
    if out_of_range.any():
        position = int(out_of_range.nonzero()[0])
        raise ValueError(
            f"targets[{position}] = {int(targets[position])} is not a class index in [0, {num_classes}); "
            "drop unlabelled (-1) samples before computing metrics"
        )
    return targets


# --------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------
def auroc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula.

    ``AUROC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` where ``R_pos`` is the sum of the
    positives' ranks among all scores; tied scores share their average rank, so a tie between a
    positive and a negative counts one half. Returns NaN when ``targets`` holds only one class
    (the AUROC is undefined there). Unknown labels must be removed before calling.
    """
    if scores.ndim != 1 or targets.ndim != 1 or scores.shape != targets.shape:
        raise ValueError(
            f"auroc needs 1-D scores and targets of equal length, got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    scores = scores.detach().cpu().double()
    targets = targets.detach().cpu().double()
    if not torch.isfinite(scores).all():
        position = int((~torch.isfinite(scores)).nonzero()[0])
        raise ValueError(f"auroc scores must be finite, scores[{position}] = {scores[position].item()}")
    not_binary = (targets != 0) & (targets != 1)
    if not_binary.any():
        position = int(not_binary.nonzero()[0])
        raise ValueError(
            f"auroc targets must be 0 or 1, targets[{position}] = {targets[position].item()} "
            "(remove unknown labels before calling)"
        )
    positive = targets == 1
    n_pos = int(positive.sum())
    n_neg = targets.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(scores)
    rank_sum = ranks[positive].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values``; equal values get the mean of the ranks they span."""
    sorted_values, order = torch.sort(values, stable=True)
    _, group_of_sorted, group_sizes = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    group_ends = group_sizes.cumsum(0).double()  # last 1-based rank in each group
    group_mean_rank = group_ends - (group_sizes.double() - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = group_mean_rank[group_of_sorted]
    return ranks


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------
# (direction, first query row, end query row, block scores) -> re-scored block
Rescore = Callable[[str, int, int, torch.Tensor], torch.Tensor]


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 256,
    rescore: Rescore | None = None,
) -> dict[str, float | int]:
    """Recall@k both ways between images and captions, computed block by block.

    Scores are plain dot products (pass L2-normalised features for cosine similarity).
    ``text_to_image[j]`` is the row of caption ``j``'s image in ``image_features``; an image may
    have several captions or none.

    * ``image_retrieval_recall@k`` (text -> image): fraction of captions whose image is among the
      k best-scoring images.
    * ``text_retrieval_recall@k`` (image -> text): fraction of images with at least one of their
      captions among the k best-scoring captions. Images without captions stay in the gallery
      as distractors but are not queries; their number is ``n_images_without_captions``.
    * ``mean_recall``: mean of all the recalls above ("mR" in remote-sensing papers when
      ``ks = (1, 5, 10)``).

    Ties count against the query: a match is within the top k only when fewer than k
    non-matching items score at least as high as it, so a collapsed model whose features are
    all equal scores 0, not 1.

    Memory: never the full N_img x N_txt matrix; at most ``block_size x max(N_img, N_txt)``
    scores at a time (each caption's row over all images, then each image's row over all
    captions).

    ``rescore(direction, start, stop, scores)`` may replace a block of dot-product scores before
    ranking (re-ranking): ``direction`` is ``text_to_image`` (rows: captions ``start:stop``,
    columns: images) or ``image_to_text`` (rows: images, columns: captions).
    """
    ks = _check_ks(ks)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    _check_retrieval_inputs(image_features, text_features, text_to_image)
    text_to_image = text_to_image.to(image_features.device).long()
    text_features = text_features.to(device=image_features.device, dtype=image_features.dtype)

    caption_ranks = _caption_ranks(image_features, text_features, text_to_image, block_size, rescore)
    image_ranks, image_has_caption = _image_ranks(image_features, text_features, text_to_image, block_size, rescore)
    queried_image_ranks = image_ranks[image_has_caption]

    metrics: dict[str, float | int] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (caption_ranks < k).double().mean().item()
        # every caption has an image, so at least one image is a query here
        metrics[f"text_retrieval_recall@{k}"] = (queried_image_ranks < k).double().mean().item()
    recalls = list(metrics.values())
    metrics["mean_recall"] = sum(recalls) / len(recalls)
    metrics["n_images"] = int(image_features.shape[0])
    metrics["n_captions"] = int(text_features.shape[0])
    metrics["n_images_without_captions"] = int((~image_has_caption).sum())
    return metrics


def _check_ks(ks: Sequence[int]) -> list[int]:
    if isinstance(ks, int):
        ks = (ks,)
    if len(ks) == 0:
        raise ValueError("ks must name at least one k for recall@k")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"every k in ks must be a positive integer, got {k!r}")
    return list(dict.fromkeys(ks))


def _check_retrieval_inputs(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor
) -> None:
    if image_features.ndim != 2 or text_features.ndim != 2:
        raise ValueError(
            "image_features and text_features must be 2-D (N, D), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            f"image_features have dimension {image_features.shape[1]} but text_features {text_features.shape[1]}"
        )
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"retrieval needs at least one image and one caption, got {num_images} and {num_texts}")
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must have shape ({num_texts},), got {tuple(text_to_image.shape)}")
    if text_to_image.is_floating_point():
        raise ValueError(f"text_to_image must hold integer image rows, got dtype {text_to_image.dtype}")
    out_of_range = (text_to_image < 0) | (text_to_image >= num_images)
    if out_of_range.any():
        position = int(out_of_range.nonzero()[0])
        raise ValueError(
            f"text_to_image[{position}] = {int(text_to_image[position])} is not an image row in [0, {num_images})"
        )
    for name, features in (("image_features", image_features), ("text_features", text_features)):
        bad_rows = (~torch.isfinite(features)).any(dim=1)
        if bad_rows.any():
            raise ValueError(f"{name} row {int(bad_rows.nonzero()[0])} contains NaN or infinite values")


def _caption_ranks(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor, block_size: int,
    rescore: Rescore | None = None,
) -> torch.Tensor:
    """For each caption: how many other images score at least as high as its own image."""
    ranks = torch.empty(text_features.shape[0], dtype=torch.long, device=image_features.device)
    for start in range(0, text_features.shape[0], block_size):
        stop = min(start + block_size, text_features.shape[0])
        scores = text_features[start:stop] @ image_features.T  # (block, N_img)
        if rescore is not None:
            scores = rescore("text_to_image", start, stop, scores)
        own_image = text_to_image[start:stop, None]
        own_score = scores.gather(1, own_image)
        scores.scatter_(1, own_image, float("-inf"))
        ranks[start:stop] = (scores >= own_score).sum(dim=1)
    return ranks.cpu()


def _image_ranks(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor, block_size: int,
    rescore: Rescore | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image: how many non-matching captions score at least as high as its best caption."""
    num_images = image_features.shape[0]
    device = image_features.device
    ranks = torch.empty(num_images, dtype=torch.long, device=device)
    has_caption = torch.zeros(num_images, dtype=torch.bool, device=device)
    has_caption[text_to_image] = True
    for start in range(0, num_images, block_size):
        stop = min(start + block_size, num_images)
        scores = image_features[start:stop] @ text_features.T  # (block, N_txt)
        if rescore is not None:
            scores = rescore("image_to_text", start, stop, scores)
        is_match = text_to_image[None, :] == torch.arange(start, stop, device=device)[:, None]
        best_match = scores.masked_fill(~is_match, float("-inf")).amax(dim=1, keepdim=True)
        ranks[start:stop] = ((scores >= best_match) & ~is_match).sum(dim=1)
    return ranks.cpu(), has_caption.cpu()


# --------------------------------------------------------------------------------------------
# distributed evaluation helper
# --------------------------------------------------------------------------------------------
def deduplicate_by_index(indices: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keep one row per dataset index, sorted by index; rows with index -1 (padding) are dropped.

    Distributed samplers repeat a few samples so every process gets equal batches, and padding
    across processes adds filler rows; both would otherwise be counted twice or as data.
    Returns ``(indices, *rows)`` filtered and sorted the same way.
    """
    for row_tensor in rows:
        if row_tensor.shape[0] != indices.shape[0]:
            raise ValueError(f"deduplicate_by_index: {row_tensor.shape[0]} rows but {indices.shape[0]} indices")
    keep = indices >= 0
    indices = indices[keep]
    rows = tuple(row_tensor[keep] for row_tensor in rows)
    unique_indices, first_position = _first_occurrence(indices)
    return (unique_indices, *(row_tensor[first_position] for row_tensor in rows))


def _first_occurrence(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.sort(indices, stable=True).indices
    sorted_indices = indices[order]
    is_first = torch.ones_like(sorted_indices, dtype=torch.bool)
    is_first[1:] = sorted_indices[1:] != sorted_indices[:-1]
    return sorted_indices[is_first], order[is_first]

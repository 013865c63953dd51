"""Metric functions against reference implementations (sklearn, a naive full score matrix)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)
from torch.overrides import TorchFunctionMode

from domainclip.core.eval.metrics import auroc, classification_metrics, deduplicate_by_index, retrieval_metrics

CLASS_NAMES = ["airport", "beach", "bridge", "desert", "forest", "harbor", "meadow"]


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn_with_an_absent_class(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(300, len(CLASS_NAMES), generator=generator)
    targets = torch.randint(0, len(CLASS_NAMES) - 1, (300,), generator=generator)  # "meadow" never occurs
    logits[torch.arange(300), targets] += 1.0  # better than chance, so recalls differ between classes
    predictions = logits.argmax(dim=1).numpy()
    labels = list(range(len(CLASS_NAMES)))

    metrics = classification_metrics(logits, targets, CLASS_NAMES)

    assert metrics["acc1"] == pytest.approx(accuracy_score(targets.numpy(), predictions))
    assert metrics["acc5"] == pytest.approx(top_k_accuracy_score(targets.numpy(), logits.numpy(), k=5, labels=labels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred holds a class absent from y_true
        expected_balanced = balanced_accuracy_score(targets.numpy(), predictions)
    assert metrics["mean_per_class_recall"] == pytest.approx(expected_balanced)
    assert metrics["balanced_accuracy"] == metrics["mean_per_class_recall"]
    assert metrics["confusion_matrix"] == confusion_matrix(targets.numpy(), predictions, labels=labels).tolist()
    expected_recall = recall_score(targets.numpy(), predictions, labels=labels, average=None, zero_division=np.nan)
    for name, expected in zip(CLASS_NAMES, expected_recall):
        if math.isnan(expected):
            assert metrics["per_class_recall"][name] is None, name
        else:
            assert metrics["per_class_recall"][name] == pytest.approx(expected), name
    assert metrics["per_class_recall"]["meadow"] is None
    assert metrics["n_samples"] == 300


def test_acc5_is_top_c_accuracy_when_there_are_fewer_than_five_classes() -> None:
    logits = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(40) % 3
    metrics = classification_metrics(logits, targets, ["a", "b", "c"])
    assert metrics["acc5"] == 1.0
    assert metrics["acc1"] == pytest.approx(accuracy_score(targets.numpy(), logits.argmax(1).numpy()))


def test_classification_metrics_reject_bad_targets_and_names() -> None:
    logits = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"^targets\[1\] = -1 is not a class index in \[0, 2\); drop unlabelled"):
        classification_metrics(logits, torch.tensor([0, -1, 1]), ["a", "b"])
    with pytest.raises(ValueError, match=r"^logits have 2 columns but 3 class names were given$"):
        classification_metrics(logits, torch.tensor([0, 1, 1]), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"^class_names must be unique, repeated: \['a'\]$"):
        classification_metrics(logits, torch.tensor([0, 1, 1]), ["a", "a"])
    with pytest.raises(ValueError, match=r"^targets must be integer class indices, got dtype torch.float32$"):
        classification_metrics(logits, torch.tensor([0.0, 1.0, 1.0]), ["a", "b"])


# --------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_on_scores_with_many_ties(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(500, generator=generator) < 0.3).long()
    # one decimal of a shifted normal: many ties, inside and across the two classes
    scores = torch.round((torch.randn(500, generator=generator) + 0.8 * targets) * 10) / 10
    assert len(torch.unique(scores)) < 100
    assert auroc(scores, targets) == pytest.approx(roc_auc_score(targets.numpy(), scores.numpy()), abs=1e-12)


def test_auroc_of_perfect_reversed_and_all_tied_scores() -> None:
    targets = torch.tensor([0, 0, 1, 1])
    assert auroc(torch.tensor([0.1, 0.2, 0.3, 0.4]), targets) == 1.0
    assert auroc(torch.tensor([0.4, 0.3, 0.2, 0.1]), targets) == 0.0
    assert auroc(torch.zeros(4), targets) == 0.5


def test_auroc_is_nan_when_one_class_is_absent() -> None:
    assert math.isnan(auroc(torch.rand(10), torch.ones(10)))
    assert math.isnan(auroc(torch.rand(10), torch.zeros(10)))


def test_auroc_rejects_non_binary_and_unknown_targets() -> None:
    with pytest.raises(ValueError, match=r"^auroc targets must be 0 or 1, targets\[2\] = 2.0 "):
        auroc(torch.rand(4), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match=r"targets\[0\] = nan \(remove unknown labels before calling\)$"):
        auroc(torch.rand(2), torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match=r"^auroc scores must be finite, scores\[1\] = inf$"):
        auroc(torch.tensor([0.0, float("inf")]), torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------
def naive_retrieval(
    image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor, ks: tuple[int, ...]
) -> dict[str, float]:
    """The whole N_txt x N_img score matrix and top-k lists, as CLIP_benchmark computes it."""
    scores = text_features @ image_features.T
    num_images = image_features.shape[0]
    has_caption = torch.zeros(num_images, dtype=torch.bool)
    has_caption[text_to_image] = True
    result: dict[str, float] = {}
    for k in ks:
        top_images = scores.topk(min(k, num_images), dim=1).indices
        result[f"image_retrieval_recall@{k}"] = (top_images == text_to_image[:, None]).any(1).double().mean().item()
        top_texts = scores.T.topk(min(k, scores.shape[0]), dim=1).indices
        image_hit = (text_to_image[top_texts] == torch.arange(num_images)[:, None]).any(1)
        result[f"text_retrieval_recall@{k}"] = image_hit[has_caption].double().mean().item()
    result["mean_recall"] = sum(result.values()) / len(result)
    return result


def random_retrieval_case(num_images: int, max_captions: int, dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    captions_per_image = torch.randint(0, max_captions + 1, (num_images,), generator=generator)
    captions_per_image[0] = 0  # at least one image without captions
    text_to_image = torch.repeat_interleave(torch.arange(num_images), captions_per_image)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=generator)]
    images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=generator), dim=1)
    # captions near their image, so recalls land between 0 and 1
    texts = images[text_to_image] + 0.9 * torch.randn(len(text_to_image), dim, generator=generator)
    return images, torch.nn.functional.normalize(texts, dim=1), text_to_image


@pytest.mark.parametrize("block_size", [1, 7, 64, 10_000])
def test_retrieval_matches_the_naive_full_matrix_for_any_block_size(block_size: int) -> None:
    images, texts, text_to_image = random_retrieval_case(num_images=120, max_captions=5, dim=16, seed=0)
    ks = (1, 5, 10)
    expected = naive_retrieval(images, texts, text_to_image, ks)
    metrics = retrieval_metrics(images, texts, text_to_image, ks=ks, block_size=block_size)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert 0.05 < metrics["image_retrieval_recall@1"] < 0.95
    assert metrics["n_images"] == 120
    assert metrics["n_captions"] == len(text_to_image)
    assert metrics["n_images_without_captions"] == int((torch.bincount(text_to_image, minlength=120) == 0).sum())


class LargestTensorResult(TorchFunctionMode):
    """Records the element count of the largest tensor any torch call returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return result


def test_retrieval_on_2000_images_and_10000_captions_stays_in_blocks() -> None:
    images, texts, text_to_image = random_retrieval_case(num_images=2_000, max_captions=9, dim=32, seed=1)
    num_texts = len(text_to_image)
    assert num_texts > 8_000
    expected = naive_retrieval(images, texts, text_to_image, (1, 5, 10))
    recorder = LargestTensorResult()
    with recorder:
        metrics = retrieval_metrics(images, texts, text_to_image, block_size=64)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    # one block row against everything, never the 2,000 x num_texts matrix
    assert recorder.largest <= 64 * num_texts
    assert recorder.largest < images.shape[0] * num_texts / 20


def test_retrieval_ties_count_against_the_query() -> None:
    # a collapsed model: every image and caption has the same feature
    features = torch.ones(3, 4) / 2
    metrics = retrieval_metrics(features, features.clone(), torch.tensor([0, 1, 2]), ks=(1, 2, 3))
    for direction in ("image_retrieval", "text_retrieval"):
        assert metrics[f"{direction}_recall@1"] == 0.0
        assert metrics[f"{direction}_recall@2"] == 0.0
        assert metrics[f"{direction}_recall@3"] == 1.0
    assert metrics["mean_recall"] == pytest.approx(1 / 3)


def test_retrieval_rejects_bad_input_with_clear_messages() -> None:
    images, texts = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"^text_to_image\[2\] = 4 is not an image row in \[0, 4\)$"):
        retrieval_metrics(images, texts, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match=r"^text_to_image must have shape \(3,\), got \(2,\)$"):
        retrieval_metrics(images, texts, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^image_features have dimension 8 but text_features 5$"):
        retrieval_metrics(images, torch.randn(3, 5), torch.tensor([0, 1, 2]))
    broken = texts.clone()
    broken[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^text_features row 1 contains NaN or infinite values$"):
        retrieval_metrics(images, broken, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"^every k in ks must be a positive integer, got 0$"):
        retrieval_metrics(images, texts, torch.tensor([0, 1, 2]), ks=(0, 5))


# --------------------------------------------------------------------------------------------
# distributed de-duplication
# --------------------------------------------------------------------------------------------
def test_deduplicate_by_index_drops_padding_and_repeated_samples() -> None:
    # what two processes gather: process 1 repeats sample 0 to even out its batch and was padded
    indices = torch.tensor([3, 0, 1, 2, 4, 0, -1, -1])
    features = torch.arange(8, dtype=torch.float32)[:, None].repeat(1, 2)
    labels = torch.tensor([30, 0, 10, 20, 40, 0, 99, 99])
    kept_indices, kept_features, kept_labels = deduplicate_by_index(indices, features, labels)
    assert kept_indices.tolist() == [0, 1, 2, 3, 4]
    assert kept_labels.tolist() == [0, 10, 20, 30, 40]
    assert kept_features[:, 0].tolist() == [1.0, 2.0, 3.0, 0.0, 4.0]  # first occurrence of each index


def test_binary_classification_reports_the_auroc_of_the_second_class() -> None:
    from sklearn.metrics import roc_auc_score

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 2, generator=generator)
    targets = torch.randint(0, 2, (40,), generator=generator)
    metrics = classification_metrics(logits, targets, ["normal", "pneumonia"])
    expected = roc_auc_score(targets.numpy(), (logits[:, 1] - logits[:, 0]).numpy())
    assert metrics["auroc"] == pytest.approx(expected, abs=1e-6)
    assert "auroc" not in classification_metrics(logits, torch.zeros(40, dtype=torch.long), ["a", "b"])  # one class only
    assert "auroc" not in classification_metrics(torch.randn(40, 3, generator=generator), targets, ["a", "b", "c"])

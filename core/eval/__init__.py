"""Evaluation: zero-shot classification, zero-shot multi-label AUROC, image-text retrieval and
CLIP_benchmark-style result files.

Metric names and the JSON layout follow LAION's CLIP_benchmark (``acc1``, ``acc5``,
``mean_per_class_recall``, ``image_retrieval_recall@k`` = text -> image,
``text_retrieval_recall@k`` = image -> text) so results compare with published tables.
"""
from __future__ import annotations

from domainclip.core.eval.metrics import auroc, classification_metrics, deduplicate_by_index, retrieval_metrics
from domainclip.core.eval.multilabel import (
    build_multilabel_classifiers,
    evaluate_multilabel,
    multilabel_logits,
    multilabel_probabilities,
)
from domainclip.core.eval.report import benchmark_json, read_metrics, to_json_value, write_metrics
from domainclip.core.eval.retrieval import captions_from_records, evaluate_retrieval
from domainclip.core.eval.tie_refine import TIE_SAFETY, TieRefiner
from domainclip.core.eval.zeroshot import (
    ZEROSHOT_LOGIT_SCALE,
    EncodedImages,
    build_zeroshot_classifier,
    class_prompts,
    encode_loader_images,
    encode_texts,
    evaluate_zeroshot,
)

__all__ = [
    "EncodedImages",
    "TIE_SAFETY",
    "TieRefiner",
    "ZEROSHOT_LOGIT_SCALE",
    "auroc",
    "benchmark_json",
    "build_multilabel_classifiers",
    "build_zeroshot_classifier",
    "captions_from_records",
    "class_prompts",
    "classification_metrics",
    "deduplicate_by_index",
    "encode_loader_images",
    "encode_texts",
    "evaluate_multilabel",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "multilabel_logits",
    "multilabel_probabilities",
    "read_metrics",
    "retrieval_metrics",
    "to_json_value",
    "write_metrics",
]

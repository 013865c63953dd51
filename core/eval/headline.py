"""The headline metric of an evaluation record: the one number per task that the kit reports.

Defined once here and used by retention (``train/evaluation.py``), WiSE-FT selection, the
comparison table, the run summary plot and ``domainclip show``: ``acc1`` for zero-shot
classification (or the metric a comparison asks for, e.g. ``balanced_accuracy``),
``mean_recall`` for retrieval and ``mean_auroc`` for multi-label classification.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

HEADLINE_METRICS: dict[str, str] = {"zeroshot_classification": "acc1", "zeroshot_retrieval": "mean_recall",
                                    "zeroshot_multilabel": "mean_auroc",
                                    "zeroshot_classification_robustness": "acc1_clean",
                                    "zeroshot_retrieval_robustness": "text_retrieval_recall@1_clean"}


def headline_name(task: str, classification_metric: str = "acc1") -> str:
    """The headline metric's name for a task type; ``classification_metric`` replaces ``acc1``."""
    if task not in HEADLINE_METRICS:
        raise ValueError(f"task {task!r} has no headline metric (known tasks: {sorted(HEADLINE_METRICS)})")
    return classification_metric if task == "zeroshot_classification" else HEADLINE_METRICS[task]


def headline(record: Mapping[str, Any], classification_metric: str = "acc1") -> tuple[str, float]:
    """``(name, value)`` of one CLIP_benchmark-style record's headline metric.

    A ``ValueError`` names the data set when the task is unknown or the metric is missing or
    undefined (e.g. a mean AUROC over labels that all lack positives).
    """
    try:
        name = headline_name(str(record.get("task")), classification_metric)
    except ValueError as err:
        raise ValueError(f"eval record of {record.get('dataset')!r}: {err}") from None
    value = record.get("metrics", {}).get(name)
    if value is None:
        raise ValueError(f"eval record of {record.get('dataset')!r} ({record.get('task')}) has no {name!r} value")
    return name, float(value)


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a record's ``metrics`` (not lists, matrices, flags or notes)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

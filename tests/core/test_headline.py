"""One definition of the headline metric, used by retention, WiSE-FT, compare and the run plot."""
from __future__ import annotations

import pytest

from domainclip.core.compare import CompareConfig, _scores
from domainclip.core.eval.headline import headline
from domainclip.core.train.evaluation import add_retention


def record(task: str, dataset: str = "d", **metrics: float) -> dict:
    return {"dataset": dataset, "task": task, "metrics": metrics}


def test_headline_of_each_task_and_errors_name_the_record() -> None:
    assert headline(record("zeroshot_classification", acc1=0.5, balanced_accuracy=0.4)) == ("acc1", 0.5)
    assert headline(record("zeroshot_classification", acc1=0.5, balanced_accuracy=0.4),
                    "balanced_accuracy") == ("balanced_accuracy", 0.4)
    assert headline(record("zeroshot_retrieval", mean_recall=0.3)) == ("mean_recall", 0.3)
    assert headline(record("zeroshot_multilabel", mean_auroc=0.7)) == ("mean_auroc", 0.7)
    with pytest.raises(ValueError, match=r"eval record of 'cxr': task 'segmentation' has no headline metric"):
        headline(record("segmentation", "cxr"))
    with pytest.raises(ValueError, match=r"eval record of 'cxr' \(zeroshot_multilabel\) has no 'mean_auroc' value"):
        headline(record("zeroshot_multilabel", "cxr", mean_auroc=None))


def test_retention_of_a_multilabel_task_uses_mean_auroc() -> None:
    after = [record("zeroshot_multilabel", "cxr", mean_auroc=0.75)]
    add_retention(after, [record("zeroshot_multilabel", "cxr", mean_auroc=0.70)])
    assert after[0]["retention"] == {"metric": "mean_auroc", "before": 0.70, "after": 0.75,
                                     "change": pytest.approx(0.05)}


def test_compare_scores_use_the_same_headline() -> None:
    spec = CompareConfig(recipe="x", methods={"a": {}}, metric="balanced_accuracy")
    scores = _scores([record("zeroshot_classification", "leaves", acc1=0.9, balanced_accuracy=0.6),
                      record("zeroshot_retrieval", "rsicd", mean_recall=0.2),
                      record("zeroshot_multilabel", "cxr", mean_auroc=0.8)], spec)
    assert scores == {"leaves": 0.6, "rsicd": 0.2, "cxr": 0.8}

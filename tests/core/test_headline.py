"""One definition of the headline metric, used by retention, WiSE-FT, compare and the run plot."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from domainclip.core.compare import CompareConfig, _scores, column_label, retention_change
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
    add_retention(after, [record("zeroshot_multilabel", "cxr", mean_auroc=0.70)], [SimpleNamespace(retention=True)])
    assert after[0]["retention"] == {"metric": "mean_auroc", "before": 0.70, "after": 0.75,
                                     "change": pytest.approx(0.05), "before_metrics": {"mean_auroc": 0.70}}


def test_retention_matches_tasks_by_position_when_names_repeat() -> None:
    """Two tasks on one unnamed CSV share their name; only the retrieval one is a retention task."""
    after = [record("zeroshot_classification", "test.csv", acc1=0.52),
             record("zeroshot_retrieval", "test.csv", mean_recall=0.3)]
    tasks = [SimpleNamespace(retention=False), SimpleNamespace(retention=True)]
    add_retention(after, [record("zeroshot_retrieval", "test.csv", mean_recall=0.1)], tasks)
    assert "retention" not in after[0]
    assert after[1]["retention"] == {"metric": "mean_recall", "before": 0.1, "after": 0.3, "change": pytest.approx(0.2),
                                     "before_metrics": {"mean_recall": 0.1}}


def test_compare_scores_use_the_same_headline() -> None:
    spec = CompareConfig(recipe="x", methods={"a": {}}, metric="balanced_accuracy")
    scores = _scores([record("zeroshot_classification", "leaves", acc1=0.9, balanced_accuracy=0.6),
                      record("zeroshot_retrieval", "rsicd", mean_recall=0.2),
                      record("zeroshot_multilabel", "cxr", mean_auroc=0.8)], spec)
    assert scores == {"leaves": 0.6, "rsicd mean_recall": 0.2, "cxr mean_auroc": 0.8}  # keys say their metric
    assert [column_label(spec, key) for key in scores] == ["leaves (balanced_accuracy)", "rsicd (mean_recall)",
                                                          "cxr (mean_auroc)"]


def test_compare_keeps_tasks_of_one_name_and_its_retention_uses_its_metric() -> None:
    spec = CompareConfig(recipe="x", methods={"a": {}}, metric="balanced_accuracy")
    records = [record("zeroshot_classification", "test.csv", acc1=0.9, balanced_accuracy=0.6),
               record("zeroshot_retrieval", "test.csv", mean_recall=0.2)]
    assert _scores(records, spec) == {"test.csv": 0.6, "test.csv#2 mean_recall": 0.2}
    trained = record("zeroshot_classification", "test.csv", acc1=0.44, balanced_accuracy=0.521)
    add_retention([trained], [record("zeroshot_classification", "test.csv", acc1=0.516, balanced_accuracy=0.516)],
                  [SimpleNamespace(retention=True)])
    assert trained["retention"]["change"] == pytest.approx(0.44 - 0.516)  # the task's headline, acc1
    assert retention_change(trained, "balanced_accuracy") == pytest.approx(0.005)  # the comparison's metric

"""Group-level (e.g. volume-level) evaluation: aggregation rules, group labels, eval reporting."""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from domainclip.core import config as config_lib
from domainclip.core.data.dataset import Collator, ImageTextDataset
from domainclip.core.data.sources import DataSourceConfig, load_records
from domainclip.core.data.transforms import build_image_transform

from ..tiny_models import tiny_open_clip
from domainclip.core.eval.groups import GroupEvalConfig, aggregate_scores, group_label, group_metrics
from domainclip.core.eval.zeroshot import evaluate_zeroshot
from domainclip.core.run_config import EvalTaskConfig, RunConfig

# Binary example used throughout ("absent" = 0, "present" = 1). Rows in manifest order:
# (group, label, probability of "present"); row 3 is unlabelled and must be left out.
ROWS = [("C", "present", 0.3), ("A", "absent", 0.2), ("B", "absent", 0.6), ("A", "", 0.99),
        ("A", "present", 0.9), ("C", "absent", 0.4), ("B", "absent", 0.1), ("C", "absent", 0.45)]
LABELLED = [row for row in ROWS if row[1]]
# Group labels with "any": A = present, B = absent, C = present.
# max:       A .9,  B .6,  C .45  -> predicted 1, 1, 0: acc 1/3, recall absent 0/1, present 1/2;
#            AUROC: A > B yes, C > B no -> 0.5
# mean:      A .55, B .35, C .3833 -> 1, 0, 0: acc 2/3, recalls 1 and 1/2; AUROC 1.0
# topk_mean (k=2): A .55, B .35, C .425 -> 1, 0, 0: same as mean
# noisy_or:  A .92, B .64, C .769 -> 1, 1, 1: acc 2/3, recalls 0 and 1; AUROC 1.0
EXPECTED = {
    "max": {"acc1": 1 / 3, "balanced_accuracy": 0.25, "auroc": 0.5, "confusion_matrix": [[0, 1], [1, 1]]},
    "mean": {"acc1": 2 / 3, "balanced_accuracy": 0.75, "auroc": 1.0, "confusion_matrix": [[1, 0], [1, 1]]},
    "topk_mean": {"acc1": 2 / 3, "balanced_accuracy": 0.75, "auroc": 1.0, "confusion_matrix": [[1, 0], [1, 1]]},
    "noisy_or": {"acc1": 2 / 3, "balanced_accuracy": 0.5, "auroc": 1.0, "confusion_matrix": [[0, 1], [0, 2]]},
}
CLASSES = ["absent", "present"]


def close(actual: object, expected: object) -> bool:
    """Equal numbers (approximately) or equal nested lists of ints."""
    return actual == expected if isinstance(expected, list) else actual == pytest.approx(expected)


def binary_logits(probabilities: list[float]) -> torch.Tensor:
    """Logits whose softmax gives ``p`` for "present"."""
    return torch.tensor([[0.0, math.log(p / (1 - p))] for p in probabilities])


@pytest.mark.parametrize("aggregate", list(EXPECTED))
def test_group_metrics_hand_computed(aggregate: str) -> None:
    logits = binary_logits([p for _, _, p in LABELLED])
    labels = torch.tensor([CLASSES.index(label) for _, label, _ in LABELLED])
    metrics = group_metrics(logits, labels, [g for g, _, _ in LABELLED], CLASSES, aggregate, k=2, prefix="volume")
    for key, value in EXPECTED[aggregate].items():
        assert close(metrics[f"volume_{key}"], value), key
    assert metrics["n_volumes"] == 3 and metrics["volume_label_rule"] == "any"
    assert metrics["volume_aggregate"] == ("topk_mean (k=2)" if aggregate == "topk_mean" else aggregate)
    assert not [key for key in metrics if key.startswith("volume_") and key.endswith(("acc5", "n_samples"))]


def test_a_two_class_group_scored_exactly_one_half_is_positive() -> None:
    metrics = group_metrics(binary_logits([0.5, 0.2]), torch.tensor([1, 0]), ["g", "h"], CLASSES, "max", prefix="vol")
    assert metrics["vol_confusion_matrix"] == [[1, 0], [0, 1]] and metrics["vol_acc1"] == 1.0


def test_groups_need_dataset_indices_when_the_loader_skipped_items(colour_squares: Path) -> None:
    model = tiny_model()
    batches = [{"images": torch.zeros(2, 3, 32, 32), "labels": torch.tensor([0, 1]), "captions": ["a", "b"],
                "bad": [("lost.jpg", "cannot read image")]}]  # a loader without "indices"
    with pytest.raises(ValueError, match="skipped bad items but its batches carry no 'indices'"):
        evaluate_zeroshot(model, batches, CLASSES, ["a {}"], groups=["A", "A", "B"],
                          group_config=GroupEvalConfig(aggregate="max", name="volume"))


def test_group_label_rules_and_multiclass_aggregation() -> None:
    assert group_label([0, 1, 0], "any", 2) == 1 and group_label([0, 0], "any", 2) == 0
    assert group_label([2, 1, 1, 2], "majority", 3) == 1  # tie -> lower class index
    assert group_label([2, 2], "same", 3) == 2
    with pytest.raises(ValueError, match=r"'same': a group's images carry different labels \[0, 1\]"):
        group_label([0, 1], "same", 2)
    with pytest.raises(ValueError, match="'any' needs two classes .* got 3"):
        group_label([0, 1], "any", 3)
    # three classes: each class's probability aggregated, arg-max predicted
    probabilities = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    labels = torch.tensor([1, 1, 0])
    metrics = group_metrics(probabilities.log(), labels, ["X", "X", "Y"], ["a", "b", "c"], "mean",
                            label_rule="majority")
    # X: mean [0.3, 0.45, 0.25] -> b (label b); Y: [0.2, 0.2, 0.6] -> c (label a)
    assert metrics["group_acc1"] == pytest.approx(0.5) and metrics["n_groups"] == 2
    assert metrics["group_per_class_recall"] == {"a": 0.0, "b": 1.0, "c": None}
    assert metrics["group_balanced_accuracy"] == pytest.approx(0.5) and "group_auroc" not in metrics
    # majority over the same images with one absent group only: no AUROC (one class)
    one_class = group_metrics(binary_logits([0.2, 0.9]), torch.tensor([0, 1]), ["A", "A"], CLASSES, "max",
                              label_rule="majority")
    assert one_class["group_acc1"] == 0.0 and "group_auroc" not in one_class  # label absent (tie), predicted present


def test_unknown_rules_and_bad_config_fail_with_the_valid_names() -> None:
    valid = re.escape("valid: ['max', 'mean', 'topk_mean', 'noisy_or']")
    with pytest.raises(ValueError, match=rf"unknown aggregation 'median'; {valid}"):
        aggregate_scores([0.1, 0.2], "median")
    with pytest.raises(ValueError, match=r"unknown group label rule 'all'; valid: \['any', 'majority', 'same'\]"):
        group_metrics(binary_logits([0.5]), torch.tensor([1]), ["A"], CLASSES, "max", label_rule="all")
    with pytest.raises(config_lib.ConfigError, match=r"eval\[0\]\.groups: unknown aggregation 'median'; valid"):
        config_lib.load(RunConfig, None, ["eval=[{groups: {aggregate: median}}]"])
    with pytest.raises(config_lib.ConfigError, match="needs task 'zeroshot', got 'retrieval'"):
        config_lib.load(RunConfig, None, ["eval=[{task: retrieval, groups: {aggregate: max}}]"])
    with pytest.raises(ValueError, match="1 of 2 images have no group id"):
        group_metrics(binary_logits([0.5, 0.5]), torch.tensor([0, 1]), ["A", ""], CLASSES, "max")
    assert EvalTaskConfig().groups == GroupEvalConfig(aggregate="")  # off by default
    assert aggregate_scores([0.1, 0.8, 0.5], "topk_mean", k=2) == pytest.approx(0.65)


def write_grouped_manifest(colour_squares: Path) -> Path:
    """The example's rows over the colour-square images, with a ``volume`` column."""
    manifest = colour_squares.parent / "grouped.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "label", "volume"])
        for i, (group, label, _) in enumerate(ROWS):
            writer.writerow([f"img/{i}.jpg", "a square", label, group])
    return manifest


def tiny_model():
    return tiny_open_clip(eval_mode=True)


def test_evaluate_zeroshot_reports_group_metrics_beside_slice_metrics(colour_squares: Path) -> None:
    manifest = write_grouped_manifest(colour_squares)
    records = load_records(DataSourceConfig(path=str(manifest), label_key="label", group_key="volume"))
    assert [r.group for r in records] == [g for g, _, _ in ROWS] and records.class_names == CLASSES
    model = tiny_model()
    loader = DataLoader(ImageTextDataset(records, build_image_transform(model.preprocess, train=False), train=False),
                        batch_size=3, collate_fn=Collator(None))
    fixed = binary_logits([p for _, _, p in LABELLED])  # the labelled images, in dataset order

    def logits_fn(features: torch.Tensor) -> torch.Tensor:
        assert features.shape[0] == len(LABELLED)
        return fixed

    metrics = evaluate_zeroshot(model, loader, CLASSES, ["a {}"], logits_fn=logits_fn,
                                groups=[r.group for r in records],
                                group_config=GroupEvalConfig(aggregate="mean", name="volume"))
    assert metrics["n_samples"] == 7 and metrics["n_unlabeled"] == 1  # slice-level metrics still there
    assert metrics["acc1"] == pytest.approx(5 / 7)  # slices: present called for p > 0.5 (rows 2, 4): rows 0, 2 wrong
    for key, value in EXPECTED["mean"].items():  # the unlabelled 0.99 of group A is not averaged in
        assert close(metrics[f"volume_{key}"], value), key
    assert metrics["n_volumes"] == 3
    without = evaluate_zeroshot(model, loader, CLASSES, ["a {}"], logits_fn=logits_fn)
    assert not [key for key in without if "volume" in key or "group" in key]


def test_eval_task_group_metrics_match_a_reference_and_need_group_ids(colour_squares: Path, tmp_path: Path) -> None:
    from domainclip.core.eval.zeroshot import ZEROSHOT_LOGIT_SCALE, build_zeroshot_classifier, encode_loader_images
    from domainclip.core.train.evaluation import eval_loader, run_eval_task

    manifest = write_grouped_manifest(colour_squares)
    model = tiny_model()
    data = {"format": "csv", "path": str(manifest), "label_key": "label", "group_key": "volume"}
    task = config_lib.load(EvalTaskConfig, None, (), base={
        "name": "grouped", "data": data, "templates": ["a {} square."],
        "groups": {"aggregate": "max", "label": "any", "name": "volume"}})
    record = run_eval_task(task, model)
    metrics = record["metrics"]
    # reference: the same logits computed by hand, grouped by group_metrics
    records, loader = eval_loader(task, model, 0)
    features = encode_loader_images(model, loader, need_labels=False).features
    logits = ZEROSHOT_LOGIT_SCALE * features @ build_zeroshot_classifier(model, CLASSES, ["a {} square."])
    labelled = [i for i, r in enumerate(records) if r.label >= 0]
    expected = group_metrics(logits[labelled], torch.tensor([records[i].label for i in labelled]),
                             [records[i].group for i in labelled], CLASSES, "max", prefix="volume")
    assert metrics["n_volumes"] == 3
    for key in ("volume_acc1", "volume_balanced_accuracy", "volume_auroc", "volume_confusion_matrix"):
        assert close(metrics[key], expected[key]), key
    assert "acc1" in metrics and metrics["n_samples"] == 7
    # the same task on records without group ids fails naming the data source
    del data["group_key"]
    bare = config_lib.load(EvalTaskConfig, None, (), base={"name": "bare", "data": data,
                                                           "groups": {"aggregate": "max"}})
    message = (f"eval task 'bare': groups.aggregate='max' needs a group id on every record, but data source format "
               f"'csv' at '{manifest}' gave 8 of 8 records none")
    with pytest.raises(ValueError, match=re.escape(message)):
        run_eval_task(bare, model)
    with pytest.raises(KeyError, match="'nope' .*group_key"):
        load_records(DataSourceConfig(path=str(manifest), group_key="nope"))

"""CT volume-level evaluation: slice records carry their volume's group id, and a zeroshot eval
task reports volume metrics computed from the slice scores (synthetic NIfTI volumes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from domainclip.core import config as config_lib
from domainclip.core.data.sources import DataSourceConfig, load_records
from domainclip.core.run_config import EvalTaskConfig
from domainclip.domains.medical.privacy import CACHE_ENV

from .make_fake_data import PHI, write_ct_set


@pytest.fixture
def three_volumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Three volumes in folders named like patient IDs: liver in 4 of 8 slices, none of 8, 2 of 6."""
    pytest.importorskip("monai", reason="MONAI (extra 'medical') is not installed")
    pytest.importorskip("nibabel", reason="nibabel (extra 'medical') is not installed")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    for name, depth, liver in (("a", 8, 4), ("b", 8, 0), ("c", 6, 2)):
        write_ct_set(tmp_path / "ct" / f"{PHI['PatientID']}_{name}", depth=depth, liver_slices=liver)
    lines = [f"{PHI['PatientID']}_{n}/ct.nii.gz,{PHI['PatientID']}_{n}/seg.nii.gz,{PHI['PatientID']}_{n}/labels.json"
             for n in "abc"]
    manifest = tmp_path / "ct" / "volumes.csv"
    manifest.write_text("image,label_map,label_names\n" + "\n".join(lines) + "\n")
    return manifest


def test_aggregation_lives_in_core() -> None:
    from domainclip.core.eval import groups
    from domainclip.domains.medical import ct

    assert ct.aggregate_scores is groups.aggregate_scores and ct.AGGREGATIONS == groups.AGGREGATIONS


def test_ct_slices_carry_a_row_group_or_the_group_column(three_volumes: Path) -> None:
    records = load_records(DataSourceConfig(format="ct_slices", path=str(three_volumes), label_key="liver"))
    assert [r.group for r in records] == ["row2"] * 8 + ["row3"] * 8 + ["row4"] * 6
    assert not [r for r in records if PHI["PatientID"] in r.group]  # never the (identifying) path
    blocks = three_volumes.parent / "blocks.csv"
    row = three_volumes.read_text().splitlines()[1]
    blocks.write_text(f"image,label_map,label_names,slices,scan\n{row},0:3,s1\n{row},3:8,s1\n{row},5:8,s2\n")
    grouped = load_records(DataSourceConfig(format="ct_slices", path=str(blocks), label_key="liver", group_key="scan"))
    assert [r.group for r in grouped] == ["s1"] * 8 + ["s2"] * 3
    with pytest.raises(KeyError, match="column 'study' .*group_key"):
        load_records(DataSourceConfig(format="ct_slices", path=str(blocks), group_key="study"))


def test_volume_level_eval_end_to_end(three_volumes: Path) -> None:
    from domainclip.core.backbones import ModelConfig, create_backbone
    from domainclip.core.eval.zeroshot import ZEROSHOT_LOGIT_SCALE, build_zeroshot_classifier, encode_loader_images
    from domainclip.core.train.evaluation import eval_loader, run_eval_task

    torch.manual_seed(0)
    model = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit")).eval()
    templates = ["an axial CT slice showing {}."]
    task = config_lib.load(EvalTaskConfig, None, (), base={
        "name": "liver", "templates": templates,
        "data": {"format": "ct_slices", "path": str(three_volumes), "label_key": "liver"},
        "groups": {"aggregate": "max", "label": "any", "name": "volume"}})
    metrics = run_eval_task(task, model)["metrics"]
    assert metrics["n_samples"] == 22 and metrics["n_volumes"] == 3
    # reference by hand: per volume the highest slice probability of "the liver", present if > 0.5
    records, loader = eval_loader(task, model, 0)
    features = encode_loader_images(model, loader).features
    logits = ZEROSHOT_LOGIT_SCALE * features @ build_zeroshot_classifier(model, records.class_names, templates)
    present = torch.softmax(logits.double(), 1)[:, 1].numpy()
    scores = np.array([present[:8].max(), present[8:16].max(), present[16:].max()])
    truth = np.array([1, 0, 1])  # a and c have liver slices, b none
    predicted = (scores >= 0.5).astype(int)
    assert metrics["volume_acc1"] == pytest.approx((predicted == truth).mean())
    recalls = [(predicted[truth == c] == c).mean() for c in (0, 1)]
    assert metrics["volume_balanced_accuracy"] == pytest.approx(np.mean(recalls))
    pairs = [(p > n) + 0.5 * (p == n) for p in scores[truth == 1] for n in scores[truth == 0]]
    assert metrics["volume_auroc"] == pytest.approx(np.mean(pairs))
    assert [sum(row) for row in metrics["volume_confusion_matrix"]] == [1, 2]
    assert metrics["volume_aggregate"] == "max" and metrics["volume_label_rule"] == "any"
    assert not [value for value in map(str, metrics.values()) if PHI["PatientID"] in value]


def test_benchmark_pseudo_volumes_are_blocks_of_consecutive_slices_per_row() -> None:
    from domainclip.core.data.records import ImageTextRecord
    from domainclip.domains.medical.benchmark import pseudo_volumes

    records = [ImageTextRecord(f"{i}.png", [], 0, group) for i, group in enumerate(["row2"] * 5 + ["row3"] * 3)]
    assert pseudo_volumes(records, 2) == ["row2/block0", "row2/block0", "row2/block1", "row2/block1", "row2/block2",
                                          "row3/block0", "row3/block0", "row3/block1"]
    assert pseudo_volumes(records, 0) == ["row2"] * 5 + ["row3"] * 3

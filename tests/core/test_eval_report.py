"""CLIP_benchmark-style result records and the atomic metrics.json writer."""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import domainclip.core.eval.report as report
from domainclip.core.eval.report import benchmark_json, read_metrics, write_metrics


def test_benchmark_json_has_clip_benchmark_layout_and_json_safe_metrics() -> None:
    metrics = {
        "acc1": torch.tensor(0.5),
        "acc5": np.float32(0.75),
        "mean_per_class_recall": float("nan"),
        "per_class_recall": {"NORMAL": 0.25, "PNEUMONIA": None},
        "confusion_matrix": torch.tensor([[1, 3], [0, 4]]),
        "bad": [("a.jpg", "truncated")],
    }
    record = benchmark_json(
        "zeroshot_classification", metrics, dataset="chest_xray", model="ViT-B-32", pretrained="openai"
    )
    assert list(record) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert record["dataset"] == "chest_xray"
    assert record["model"] == "ViT-B-32"
    assert record["pretrained"] == "openai"
    assert record["task"] == "zeroshot_classification"
    assert record["language"] == "en"
    assert record["metrics"] == {
        "acc1": 0.5,
        "acc5": 0.75,
        "mean_per_class_recall": None,  # NaN has no place in strict JSON
        "per_class_recall": {"NORMAL": 0.25, "PNEUMONIA": None},
        "confusion_matrix": [[1, 3], [0, 4]],
        "bad": [["a.jpg", "truncated"]],
    }
    json.dumps(record, allow_nan=False)


def test_benchmark_json_rejects_missing_names_and_unserialisable_values() -> None:
    with pytest.raises(ValueError, match=r"^benchmark_json: model must be a non-empty string, got ''$"):
        benchmark_json("zeroshot_retrieval", {}, dataset="rsicd", model="")
    with pytest.raises(TypeError, match=r"^cannot write a object \(<object object at"):
        benchmark_json("zeroshot_retrieval", {"x": object()}, dataset="rsicd", model="m")


def test_write_metrics_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    records = [
        benchmark_json("zeroshot_retrieval", {"image_retrieval_recall@1": 0.1, "mean_recall": math.inf}, "rsicd", "m"),
        benchmark_json("zeroshot_classification", {"acc1": 0.9}, "plantvillage", "m", "run-3", language="de"),
    ]
    path = write_metrics(tmp_path / "run" / "metrics.json", records)
    assert path == tmp_path / "run" / "metrics.json"
    assert read_metrics(path) == json.loads(path.read_text()) == records
    assert records[0]["metrics"]["mean_recall"] is None
    assert os.listdir(path.parent) == ["metrics.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_write_metrics_keeps_the_old_file_when_the_rename_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "metrics.json"
    old = [benchmark_json("zeroshot_classification", {"acc1": 0.5}, "d", "m")]
    write_metrics(path, old)

    def failing_replace(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_metrics(path, [benchmark_json("zeroshot_classification", {"acc1": 0.9}, "d", "m")])
    assert read_metrics(path) == old
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_write_metrics_rejects_records_without_the_benchmark_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^write_metrics: result 1 lacks keys \['pretrained', 'language'\]; build it"):
        write_metrics(
            tmp_path / "metrics.json",
            [benchmark_json("t", {}, "d", "m"), {"dataset": "d", "model": "m", "task": "t", "metrics": {}}],
        )
    with pytest.raises(ValueError, match=r"^write_metrics takes a list of records; wrap a single record in a list$"):
        write_metrics(tmp_path / "metrics.json", benchmark_json("t", {}, "d", "m"))
    assert not (tmp_path / "metrics.json").exists()


def test_a_damaged_metrics_file_is_named_in_the_error(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text('[{"dataset": "d", ')
    with pytest.raises(ValueError, match=r"metrics\.json: not valid JSON \(Expecting"):
        read_metrics(tmp_path / "metrics.json")

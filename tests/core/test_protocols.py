"""Evaluation protocols: k-shot draws, base-to-novel class splits, file-name scene classes."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from domainclip.core.data import DataSourceConfig, load_records
from domainclip.core.data.sources import filename_prefix

from ..conftest import shared_data_root


def folders(tmp_path: Path, classes: dict[str, int]) -> Path:
    from PIL import Image

    for name, count in classes.items():
        (tmp_path / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8)).save(tmp_path / name / f"{i}.png")
    return tmp_path


def test_k_shot_draws_k_per_class_by_seed(tmp_path: Path) -> None:
    root = folders(tmp_path, {"a": 6, "b": 5, "c": 7})
    draw = lambda seed: load_records(DataSourceConfig(format="folders", path=str(root), shots=4, shot_seed=seed))
    first, again, other = draw(0), draw(0), draw(1)
    assert Counter(r.label for r in first) == {0: 4, 1: 4, 2: 4}
    assert [r.image for r in first] == [r.image for r in again]
    assert [r.image for r in first] != [r.image for r in other]
    with pytest.raises(ValueError, match=r"shots=6: .* fewer records for classes \{'b': 5\}"):
        load_records(DataSourceConfig(format="folders", path=str(root), shots=6))


def test_base_and_novel_split_the_classes_and_renumber(tmp_path: Path) -> None:
    root = folders(tmp_path, {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5})
    base = load_records(DataSourceConfig(format="folders", path=str(root), class_subset="base"))
    novel = load_records(DataSourceConfig(format="folders", path=str(root), class_subset="novel"))
    assert base.class_names == ["a", "b", "c"] and novel.class_names == ["d", "e"]
    assert Counter(r.label for r in novel) == {0: 4, 1: 5}
    assert len(base) == 6
    with pytest.raises(ValueError, match="class_subset must be one of"):
        load_records(DataSourceConfig(format="folders", path=str(root), class_subset="new"))


@pytest.mark.parametrize("name, expected", [("airport_348.jpg", "airport"), ("denseresidential_12.jpg", "denseresidential"),
                                            ("00001.jpg", None), ("viaduct-7.png", "viaduct")])
def test_filename_prefix(name: str, expected: str | None) -> None:
    assert filename_prefix(name) == expected


def test_rsicd_scene_classes_from_file_names(tmp_path: Path) -> None:
    annotations = {"images": [
        {"filename": "airport_1.jpg", "split": "test", "sentences": [{"raw": "planes"}]},
        {"filename": "beach_2.jpg", "split": "test", "sentences": [{"raw": "sand"}]},
        {"filename": "123.jpg", "split": "test", "sentences": [{"raw": "something"}]},
    ]}
    (tmp_path / "d.json").write_text(json.dumps(annotations))
    records = load_records(DataSourceConfig(format="karpathy", path=str(tmp_path / "d.json"), label_key="@filename_prefix"))
    assert records.class_names == ["airport", "beach"]
    assert [r.label for r in records] == [0, 1, -1]  # the numeric name stays unlabelled, not mislabelled


@pytest.mark.shared_data
def test_real_rsicd_has_30_scene_classes() -> None:
    path = shared_data_root() / "remote_sensing" / "rsicd" / "dataset_rsicd.json"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    records = load_records(DataSourceConfig(format="karpathy", path=str(path), label_key="@filename_prefix"))
    assert len(records.class_names) == 30
    assert sum(1 for r in records if r.label < 0) == 921


def test_hash_holdout_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    root = folders(tmp_path, {"a": 40, "b": 40})
    cfg = lambda side: DataSourceConfig(format="folders", path=str(root), holdout=side, holdout_fraction=0.25)
    train, test, everything = load_records(cfg("train")), load_records(cfg("test")), load_records(cfg(""))
    assert {r.image for r in train} | {r.image for r in test} == {r.image for r in everything}
    assert not {r.image for r in train} & {r.image for r in test}
    assert 8 <= len(test) <= 32  # about a quarter of 80
    assert [r.image for r in load_records(cfg("test"))] == [r.image for r in test]
    with pytest.raises(ValueError, match="holdout must be"):
        load_records(DataSourceConfig(format="folders", path=str(root), holdout="val", holdout_fraction=0.2))

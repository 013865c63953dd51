"""Manifest readers: every format against the fake data's ground truth, errors, shared data."""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from domainclip.core.data import DataSourceConfig, ImageTextRecord, load_records, valid_formats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import make_fake_images as fake  # noqa: E402
from ..conftest import shared_data_root  # noqa: E402


def shared_data() -> Path:
    return shared_data_root()


RSICD_JSON = shared_data() / "remote_sensing" / "rsicd" / "dataset_rsicd.json"
PLANTVILLAGE = shared_data() / "agriculture" / "plantvillage_apple"
needs_rsicd = pytest.mark.skipif(not RSICD_JSON.is_file(), reason=f"shared RSICD data not found at {RSICD_JSON}")
needs_plantvillage = pytest.mark.skipif(
    not (PLANTVILLAGE / "train.csv").is_file(), reason=f"shared PlantVillage data not found at {PLANTVILLAGE}"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> fake.FakeData:
    return fake.make_fake_dataset(tmp_path_factory.mktemp("fake"))


def expected_records(data: fake.FakeData, rows=fake.ROWS) -> list[ImageTextRecord]:
    """Ground truth from the fixture rows: labels numbered by sorted raw class name."""
    classes = sorted({row.label for row in fake.ROWS})
    return [
        ImageTextRecord(os.path.join(data.root, row.image), list(row.captions), classes.index(row.label)) for row in rows
    ]


# --- manifests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_formats_read_paths_captions_and_labels(data: fake.FakeData, fmt: str) -> None:
    separator = fake.CAPTION_SEPARATOR if fmt == "csv" else ""
    cfg = DataSourceConfig(format=fmt, path=str(getattr(data, fmt)), caption_separator=separator, label_key="label")
    loaded = load_records(cfg)
    assert loaded.records == expected_records(data)
    assert loaded.class_names == ["bird", "dog", "tabby cat"]
    assert loaded.raw_class_names == ["bird", "dog", "tabby_cat"]
    assert loaded.skipped == []


def test_csv_without_separator_keeps_the_cell_as_one_caption(data: fake.FakeData) -> None:
    loaded = load_records(DataSourceConfig(format="csv", path=str(data.csv)))
    assert loaded.records[0].captions == [" | ".join(fake.ROWS[0].captions)]
    assert [r.label for r in loaded.records] == [-1] * len(fake.ROWS)
    assert loaded.class_names == []


@pytest.mark.parametrize("split, wanted", [("train", {"train"}), ("val,test", {"val", "test"})])
def test_split_column_filters_rows(data: fake.FakeData, split: str, wanted: set[str]) -> None:
    cfg = DataSourceConfig(format="jsonl", path=str(data.jsonl), split=split, label_key="label")
    rows = [row for row in fake.ROWS if row.split in wanted]
    assert load_records(cfg).records == expected_records(data, rows)


def test_split_without_split_column_is_an_error(data: fake.FakeData) -> None:
    with pytest.raises(KeyError, match=r"column 'split' \(config key 'split'\) not found in .*labels\.csv"):
        load_records(DataSourceConfig(format="label_csv", path=str(data.label_csv), split="train"))


def test_split_that_matches_no_row_lists_the_splits_present(data: fake.FakeData) -> None:
    with pytest.raises(ValueError, match=r"no rows of split 'tran' \(config key 'split'\) in .*dataset\.json; "
                                         r"splits present: \['test', 'train', 'val'\]"):
        load_records(DataSourceConfig(format="karpathy", path=str(data.karpathy), split="tran"))


def test_image_root_overrides_the_manifest_folder(data: fake.FakeData, tmp_path: Path) -> None:
    loaded = load_records(DataSourceConfig(format="csv", path=str(data.csv), image_root=str(tmp_path)))
    assert [r.image for r in loaded.records] == [os.path.join(tmp_path, row.image) for row in fake.ROWS]


def test_limit_keeps_the_first_records_after_the_split_filter(data: fake.FakeData) -> None:
    loaded = load_records(DataSourceConfig(format="csv", path=str(data.csv), split="train", limit=2))
    assert [r.image for r in loaded.records] == [os.path.join(data.root, r.image) for r in fake.ROWS if r.split == "train"][:2]


def test_rows_without_caption_use_templates_or_are_listed_as_skipped(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    pd.DataFrame(
        {"image": ["a.jpg", "b.jpg", "c.jpg"], "caption": ["a red car", "", ""], "label": ["", "fire_truck", ""]}
    ).to_csv(manifest, index=False)
    cfg = DataSourceConfig(format="csv", path=str(manifest), label_key="label", templates=["a {}.", "an image of a {}."])
    loaded = load_records(cfg)
    assert loaded.records == [
        ImageTextRecord(str(tmp_path / "a.jpg"), ["a red car"], -1),
        ImageTextRecord(str(tmp_path / "b.jpg"), ["a fire truck.", "an image of a fire truck."], 0),
    ]
    assert loaded.skipped == [(f"{manifest}:4", "no caption in column 'caption' and no label")]


def test_manifest_with_no_caption_at_all_names_the_first_row(tmp_path: Path) -> None:
    manifest = tmp_path / "empty.csv"
    pd.DataFrame({"image": ["a.jpg", "b.jpg"], "caption": ["", "  "]}).to_csv(manifest, index=False)
    with pytest.raises(ValueError, match=rf"has no usable rows \(2 skipped\); first: {manifest}:2: no caption"):
        load_records(DataSourceConfig(format="csv", path=str(manifest)))


def test_jsonl_dotted_caption_key_reads_nested_lists(tmp_path: Path) -> None:
    manifest = tmp_path / "multi.jsonl"
    lines = [{"image": "x.jpg", "captions": {"en": ["a dog"], "de": ["ein Hund", "der Hund"]}},
             {"image": "y.jpg", "captions": {"en": ["a cat"]}}]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    loaded = load_records(DataSourceConfig(format="jsonl", path=str(manifest), caption_key="captions.de"))
    assert loaded.records == [ImageTextRecord(str(tmp_path / "x.jpg"), ["ein Hund", "der Hund"])]
    assert loaded.skipped == [(f"{manifest}:2", "no caption in column 'captions.de' and no label")]


def test_numeric_labels_are_numbered_in_numeric_order(tmp_path: Path) -> None:
    manifest = tmp_path / "numbers.csv"
    pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg"], "label": ["10", "2", "1"]}).to_csv(manifest, index=False)
    loaded = load_records(DataSourceConfig(format="label_csv", path=str(manifest)))
    assert loaded.raw_class_names == ["1", "2", "10"]
    assert [r.label for r in loaded.records] == [2, 1, 0]


# --- label CSV, Karpathy, folders -------------------------------------------------------------------
def test_label_csv_builds_captions_from_templates_and_class_name_map(data: fake.FakeData) -> None:
    templates = ["a photo of a {}.", "a {} in the wild."]
    cfg = DataSourceConfig(format="label_csv", path=str(data.label_csv), templates=templates,
                           class_names={"tabby_cat": "cat"})
    loaded = load_records(cfg)
    assert loaded.class_names == ["bird", "dog", "cat"]
    assert loaded.records[0] == ImageTextRecord(str(data.root / fake.ROWS[0].image), ["a photo of a cat.", "a cat in the wild."], 2)
    assert [r.label for r in loaded.records] == [r.label for r in expected_records(data)]


def test_class_name_map_fixes_the_class_set_across_splits(data: fake.FakeData) -> None:
    mapping = {"bird": "bird", "dog": "dog", "tabby_cat": "cat", "zebra": "zebra"}
    loaded = load_records(DataSourceConfig(format="jsonl", path=str(data.jsonl), split="val", label_key="label", class_names=mapping))
    assert loaded.raw_class_names == ["bird", "dog", "tabby_cat", "zebra"]
    assert [r.label for r in loaded.records] == [2]


def test_karpathy_json_all_splits_with_filepath(data: fake.FakeData) -> None:
    loaded = load_records(DataSourceConfig(format="karpathy", path=str(data.karpathy)))
    images = data.karpathy.parent / "images"
    expected_paths = [str(images / Path(r.image).name) for r in fake.ROWS[:-1]] + [str(images / "sub" / "bird_0.png")]
    assert [r.image for r in loaded.records] == expected_paths
    assert all(Path(p).is_file() for p in expected_paths)
    assert [r.captions for r in loaded.records] == [list(r.captions) for r in fake.ROWS]
    assert {r.label for r in loaded.records} == {-1}


def test_karpathy_split_filter(data: fake.FakeData) -> None:
    loaded = load_records(DataSourceConfig(format="karpathy", path=str(data.karpathy), split="train"))
    assert [Path(r.image).name for r in loaded.records] == [Path(r.image).name for r in fake.ROWS if r.split == "train"]


def test_karpathy_finds_an_images_folder_named_like_rsicd(tmp_path: Path) -> None:
    fake.write_image(tmp_path / "FOO_images" / "a.jpg", fake.solid_image((1, 2, 3)))
    (tmp_path / "data.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "x"}]}]}))
    loaded = load_records(DataSourceConfig(format="karpathy", path=str(tmp_path / "data.json")))
    assert loaded.records == [ImageTextRecord(str(tmp_path / "FOO_images" / "a.jpg"), ["x"])]


def test_folders_number_classes_by_sorted_folder_name(data: fake.FakeData) -> None:
    loaded = load_records(DataSourceConfig(format="folders", path=str(data.folders), templates=["a {}.", "the {}"]))
    classes = sorted(fake.FOLDER_CLASSES)
    assert loaded.raw_class_names == classes
    assert loaded.class_names == ["ant", "sea lion", "zebra"]
    assert Counter(r.label for r in loaded.records) == {classes.index(n): c for n, c in fake.FOLDER_CLASSES.items()}
    sea_lion = [r for r in loaded.records if r.label == classes.index("sea_lion")]
    assert sea_lion[0].captions == ["a sea lion.", "the sea lion"]
    assert all(Path(r.image).parent.name == classes[r.label] for r in loaded.records)
    assert [(Path(p).name, reason.split(" (")[0]) for p, reason in loaded.skipped] == [("notes.txt", "not an image extension")]


def test_folders_split_selects_a_subfolder(data: fake.FakeData, tmp_path: Path) -> None:
    for split in ("train", "test"):
        fake.write_class_folders(tmp_path / split, {"a": 1, "b": 2} if split == "train" else {"a": 2, "b": 1})
    loaded = load_records(DataSourceConfig(format="folders", path=str(tmp_path), split="test"))
    assert sorted(r.label for r in loaded.records) == [0, 0, 1]
    assert all(f"{os.sep}test{os.sep}" in r.image for r in loaded.records)
    # a split that is no folder there is an error, not the split folders read as classes
    with pytest.raises(ValueError, match=r"split 'val' \(config key 'split'\): .*val is not a folder; .*"
                                         r"\(folders in .*: \['test', 'train'\]\)"):
        load_records(DataSourceConfig(format="folders", path=str(tmp_path), split="val"))


@pytest.mark.parametrize("fmt", ["jsonl", "karpathy"])
def test_json_files_may_start_with_a_byte_order_mark(data: fake.FakeData, tmp_path: Path, fmt: str) -> None:
    source = getattr(data, fmt)
    marked = source.with_name(f"bom-{source.name}")
    marked.write_bytes(b"\xef\xbb\xbf" + source.read_bytes())
    options = {"label_key": "label"} if fmt == "jsonl" else {}
    assert load_records(DataSourceConfig(format=fmt, path=str(marked), **options)).records == \
        load_records(DataSourceConfig(format=fmt, path=str(source), **options)).records


# --- errors -----------------------------------------------------------------------------------------
def test_unknown_format_names_it_lists_valid_ones_and_suggests() -> None:
    with pytest.raises(ValueError) as error:
        load_records(DataSourceConfig(format="jsnl", path="x"))
    message = str(error.value)
    assert "unknown data format 'jsnl'" in message
    assert "did you mean 'jsonl'?" in message
    for name in ("csv", "jsonl", "parquet", "karpathy", "folders", "label_csv", "webdataset"):
        assert name in message
    core = {"csv", "jsonl", "parquet", "karpathy", "folders", "label_csv", "webdataset"}
    assert core <= set(valid_formats())
    # an unknown name loads the domain plugins; every other format must come from a domain package
    from domainclip.core.data.sources import FORMAT_LOADERS

    assert all(FORMAT_LOADERS[name].__module__.startswith("domainclip.domains.") for name in set(valid_formats()) - core)


def test_missing_file_names_the_path_and_config_key(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(FileNotFoundError, match=rf"data path not found: '{missing}' \(config key 'path'"):
        load_records(DataSourceConfig(format="csv", path=str(missing)))


def test_missing_column_names_column_file_and_columns_present(data: fake.FakeData) -> None:
    cfg = DataSourceConfig(format="csv", path=str(data.csv), image_key="filepath")
    expected = rf"column 'filepath' \(config key 'image_key'\) not found in {data.csv}; columns present: \['image', 'caption', 'label', 'split'\]"
    with pytest.raises(KeyError, match=expected):
        load_records(cfg)
    with pytest.raises(ValueError, match=expected):
        load_records(cfg)


def test_missing_caption_column_without_labels_is_an_error(data: fake.FakeData) -> None:
    with pytest.raises(KeyError, match=r"column 'text' \(config key 'caption_key'\) not found"):
        load_records(DataSourceConfig(format="parquet", path=str(data.parquet), caption_key="text"))


def test_bad_jsonl_line_is_reported_with_its_line_number(tmp_path: Path) -> None:
    manifest = tmp_path / "broken.jsonl"
    manifest.write_text('{"image": "a.jpg", "caption": "x"}\n{"image": \n')
    with pytest.raises(ValueError, match=rf"{manifest}:2: not valid JSON"):
        load_records(DataSourceConfig(format="jsonl", path=str(manifest)))


def test_webdataset_format_points_to_build_webdataset() -> None:
    with pytest.raises(ValueError, match="build_webdataset"):
        load_records(DataSourceConfig(format="webdataset", path="shards-{0..1}.tar"))


# --- shared real data -------------------------------------------------------------------------------
@needs_rsicd
def test_rsicd_karpathy_json_split_counts_and_five_captions() -> None:
    loaded = load_records(DataSourceConfig(format="karpathy", path=str(RSICD_JSON)))
    assert len(loaded) == 10_921
    assert all(len(r.captions) == 5 for r in loaded.records)
    assert Path(loaded.records[0].image).parent == RSICD_JSON.parent / "RSICD_images"
    assert loaded.skipped == []
    counts = {split: len(load_records(DataSourceConfig(format="karpathy", path=str(RSICD_JSON), split=split)))
              for split in ("train", "val", "test")}
    assert counts == {"train": 8_734, "val": 1_094, "test": 1_093}


@needs_plantvillage
def test_plantvillage_train_csv_has_four_classes_with_readme_counts() -> None:
    loaded = load_records(DataSourceConfig(format="label_csv", path=str(PLANTVILLAGE / "train.csv")))
    assert loaded.raw_class_names == ["Apple___Apple_scab", "Apple___Black_rot", "Apple___Cedar_apple_rust", "Apple___healthy"]
    assert Counter(r.label for r in loaded.records) == {0: 502, 1: 480, 2: 226, 3: 1_328}
    assert all(r.image.startswith(str(PLANTVILLAGE / "images")) for r in loaded.records)
    assert all(Path(r.image).parent.name == loaded.raw_class_names[r.label] for r in loaded.records[:300])
    assert all(Path(r.image).is_file() for r in loaded.records[:50])

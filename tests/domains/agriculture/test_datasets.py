"""PlantVillage formats and dataset: natural class names, crop / disease labels, layouts, errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from domainclip.core.data.sources import DataSourceConfig, load_records
from domainclip.domains.agriculture import LEAF_TEMPLATES, parse_class_name
from domainclip.domains.agriculture.datasets import PlantVillage

from .make_fake_data import APPLE, CLASSES, write_plantvillage

from ...conftest import shared_data_root  # noqa: E402

SHARED = shared_data_root() / "agriculture" / "plantvillage_apple"
SAMPLE = Path(__file__).resolve().parents[3] / "recipes" / "sample_data" / "plantvillage_apple"


@pytest.mark.parametrize("raw, full, crop, disease", [
    ("Apple___Cedar_apple_rust", "an apple leaf with cedar apple rust", "an apple leaf", "a leaf with cedar apple rust"),
    ("Apple___healthy", "a healthy apple leaf", "an apple leaf", "a healthy leaf"),
    ("Corn_(maize)___Common_rust_", "a corn leaf with common rust", "a corn leaf", "a leaf with common rust"),
    ("Pepper,_bell___Bacterial_spot", "a bell pepper leaf with bacterial spot", "a bell pepper leaf",
     "a leaf with bacterial spot"),
    ("Okra___Yellow_Vein_Mosaic", "an okra leaf with yellow vein mosaic", "an okra leaf", "a leaf with yellow vein mosaic"),
])
def test_class_phrases(raw: str, full: str, crop: str, disease: str) -> None:
    leaf = parse_class_name(raw)
    assert (leaf.phrase("full"), leaf.phrase("crop"), leaf.phrase("disease")) == (full, crop, disease)


def test_bad_class_name_and_attribute() -> None:
    with pytest.raises(ValueError, match="'healthy_leaf' is not in the PlantVillage layout"):
        parse_class_name("healthy_leaf")
    with pytest.raises(ValueError, match="label attribute must be one of"):
        parse_class_name("Apple___healthy").phrase("colour")


def test_three_formats_share_images_and_split_labels(tmp_path: Path) -> None:
    root = write_plantvillage(tmp_path / "pv", list(CLASSES), per_class=2)
    full = load_records(DataSourceConfig(format="plantvillage", path=str(root), split="train"))
    crop = load_records(DataSourceConfig(format="plantvillage_crop", path=str(root), split="train"))
    disease = load_records(DataSourceConfig(format="plantvillage_disease", path=str(root), split="train"))
    assert [r.image for r in full] == [r.image for r in crop] == [r.image for r in disease]
    assert len(full) == 2 * len(CLASSES) and len(full.class_names) == 6
    assert crop.raw_class_names == ["apple", "grape", "tomato"]
    assert crop.class_names == ["an apple leaf", "a grape leaf", "a tomato leaf"]
    # black rot on apple and grape is one disease class, healthy apple and tomato too
    assert disease.raw_class_names == ["apple scab", "black rot", "cedar apple rust", "healthy"]
    by_image = {r.image: (f.label, c.label, d.label) for r, f, c, d in zip(full, full, crop, disease)}
    grape = next(image for image in by_image if "Grape___Black_rot" in image)
    apple_rot = next(image for image in by_image if "Apple___Black_rot" in image)
    assert by_image[grape][2] == by_image[apple_rot][2] == 1 and by_image[grape][1] != by_image[apple_rot][1]
    first = next(r for r in disease if "Tomato___healthy" in r.image)
    assert first.captions == [t.replace("{}", "a healthy leaf") for t in LEAF_TEMPLATES]


def test_layouts_folders_and_csv_file(tmp_path: Path) -> None:
    root = write_plantvillage(tmp_path / "pv", per_class=2)
    folders = load_records(DataSourceConfig(format="plantvillage", path=str(root)))  # images/<class>/ only
    assert len(folders) == 4 * 2 * 2 and folders.class_names[3] == "a healthy apple leaf"
    csv_file = load_records(DataSourceConfig(format="plantvillage_disease", path=str(root / "test.csv")))
    assert len(csv_file) == 8 and csv_file.class_names[-1] == "a healthy leaf"
    with pytest.raises(FileNotFoundError, match="split 'val'"):
        load_records(DataSourceConfig(format="plantvillage", path=str(root), split="val"))
    with pytest.raises(ValueError, match="one CSV file"):
        load_records(DataSourceConfig(format="plantvillage", path=str(root / "test.csv"), split="test"))


def test_class_name_overrides(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_plantvillage(tmp_path / "pv", per_class=1)
    names = load_records(DataSourceConfig(format="plantvillage_disease", path=str(root), split="test",
                                          class_names={"healthy": "a leaf without disease"})).class_names
    assert names[-1] == "a leaf without disease"
    full = load_records(DataSourceConfig(format="plantvillage", path=str(root), split="test",
                                         class_names={"Apple___healthy": "no disease, healthy"}))
    assert full.class_names[-1] == "no disease, healthy" and full.class_names[0] == "an apple leaf with apple scab"
    # a key in no file of the data is kept as a class of its own (core label_csv behaviour), with a warning
    with caplog.at_level("WARNING", logger="domainclip.domains.agriculture"):
        typo = load_records(DataSourceConfig(format="plantvillage", path=str(root), split="test",
                                             class_names={"Apple___Blackrot": "typo"}))
    assert typo.raw_class_names == ["Apple___Apple_scab", "Apple___Black_rot", "Apple___Blackrot",
                                    "Apple___Cedar_apple_rust", "Apple___healthy"]
    assert typo.class_names[2] == "typo" and sorted({r.label for r in typo}) == [0, 1, 3, 4]
    assert "['Apple___Blackrot'] are not full classes of this data" in caplog.text
    rust = load_records(DataSourceConfig(format="plantvillage_disease", path=str(root), split="test",
                                         class_names={"rust": "x"}))
    assert rust.raw_class_names == ["apple scab", "black rot", "cedar apple rust", "healthy", "rust"]
    with pytest.raises(ValueError, match=r"class_names keys \['Apple___Black_rot'\] are full class names, "
                                         r"but disease classes are keyed by disease words"):
        load_records(DataSourceConfig(format="plantvillage_disease", path=str(root), split="test",
                                      class_names={"Apple___Black_rot": "x"}))
    with pytest.raises(ValueError, match="class_names key 'healthy_leaf': class name 'healthy_leaf' is not in"):
        load_records(DataSourceConfig(format="plantvillage", path=str(root), split="test",
                                      class_names={"healthy_leaf": "x"}))


def _drop_class(manifest: Path, raw: str) -> None:
    """Remove every row of class ``raw`` from a ``path,label`` CSV."""
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(line for line in lines if not line.rstrip().endswith("," + raw)))


@pytest.mark.parametrize("attribute", ["full", "crop", "disease"])
def test_splits_number_classes_alike_when_a_split_lacks_a_class(tmp_path: Path, attribute: str) -> None:
    fmt = {"full": "plantvillage", "crop": "plantvillage_crop", "disease": "plantvillage_disease"}[attribute]
    root = write_plantvillage(tmp_path / "pv", list(CLASSES), per_class=2)
    _drop_class(root / "test.csv", "Apple___Apple_scab")  # "apple scab" is then absent from test
    _drop_class(root / "test.csv", "Grape___Black_rot")  # and the grape crop
    (root / "notes.csv").write_text("author,year\nme,2024\n")  # not a split manifest: ignored
    train = load_records(DataSourceConfig(format=fmt, path=str(root), split="train"))
    test = load_records(DataSourceConfig(format=fmt, path=str(root), split="test"))
    assert len(test) == 2 * (len(CLASSES) - 2)
    assert test.raw_class_names == train.raw_class_names and test.class_names == train.class_names
    label = {"full": {"Apple___Black_rot": 1, "Apple___healthy": 3, "Tomato___healthy": 5},
             "crop": {"Apple___Black_rot": 0, "Apple___healthy": 0, "Tomato___healthy": 2},
             "disease": {"Apple___Black_rot": 1, "Apple___healthy": 3, "Tomato___healthy": 3}}[attribute]
    for records in (train, test):
        for record in records:
            raw = Path(record.image).parent.name
            if raw in label:
                assert record.label == label[raw], (raw, record.label)
    # with class_names listing every class (the core remedy) the numbering is the same
    keys = {"full": list(CLASSES), "crop": ["apple", "grape", "tomato"],
            "disease": ["apple scab", "black rot", "cedar apple rust", "healthy"]}[attribute]
    named = load_records(DataSourceConfig(format=fmt, path=str(root), split="test",
                                          class_names={key: key.upper() for key in keys}))
    assert named.raw_class_names == train.raw_class_names and named.class_names == [k.upper() for k in keys]
    assert [r.label for r in named] == [r.label for r in test]
    # a single split file (no other split to look at) keeps every class_names key as a class
    alone = load_records(DataSourceConfig(format=fmt, path=str(root / "test.csv"),
                                          class_names={key: key.upper() for key in keys}))
    assert alone.raw_class_names == train.raw_class_names and [r.label for r in alone] == [r.label for r in test]
    data = PlantVillage(str(root), "test", label_attribute=attribute)
    assert data.class_names == train.class_names and [r.label for r in data.records] == [r.label for r in test]


def test_split_folders_number_classes_alike(tmp_path: Path) -> None:
    root = write_plantvillage(tmp_path / "pv", per_class=1)
    for split in ("train", "test"):
        for raw in APPLE:
            if split == "test" and raw == "Apple___Apple_scab":
                continue
            (root / split / raw).mkdir(parents=True)
            (root / split / raw / "leaf.png").write_bytes((root / "images" / raw / "test_0.png").read_bytes())
    for name in ("train.csv", "test.csv"):
        (root / name).unlink()
    (root / "extras" / "misc").mkdir(parents=True)  # a sibling folder that is not a split: ignored
    train = load_records(DataSourceConfig(format="plantvillage", path=str(root), split="train"))
    test = load_records(DataSourceConfig(format="plantvillage", path=str(root), split="test"))
    assert train.raw_class_names == test.raw_class_names == APPLE
    assert [r.label for r in train] == [0, 1, 2, 3] and [r.label for r in test] == [1, 2, 3]


def test_dataset_samples_carry_both_attributes(tmp_path: Path) -> None:
    root = write_plantvillage(tmp_path / "pv", list(CLASSES), per_class=1, size=24)
    data = PlantVillage(str(root), "test", label_attribute="crop")
    sample = next(data[i] for i in range(len(data)) if "Grape" in data.records[i].image)
    assert sample["class_name"] == "a grape leaf" and sample["crop"] == "grape" and sample["disease"] == "black rot"
    assert sample["image"].shape == (3, 24, 24) and sample["image"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    with pytest.raises(NotImplementedError, match="no automatic download"):
        PlantVillage(str(root), download=True)
    with pytest.raises(ValueError, match="label_attribute must be one of"):
        PlantVillage(str(root), label_attribute="colour")


def test_bad_image_is_reported_not_raised(tmp_path: Path) -> None:
    root = write_plantvillage(tmp_path / "pv", per_class=1)
    broken = root / "images" / "Apple___healthy" / "test_0.png"
    broken.write_bytes(b"not a png")
    data = PlantVillage(str(root), "test")
    bad = data[[r.image for r in data.records].index(str(broken))]
    assert bad["bad"][0] == str(broken) and "cannot read image" in bad["bad"][1]


def test_bundled_sample() -> None:
    data = PlantVillage(str(SAMPLE), "train", label_attribute="disease")
    assert len(data) == 160 and data.class_names == ["a leaf with apple scab", "a leaf with black rot",
                                                      "a leaf with cedar apple rust", "a healthy leaf"]


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared PlantVillage apple data not found at {SHARED}")
def test_shared_plantvillage_apple_counts() -> None:
    train = load_records(DataSourceConfig(format="plantvillage", path=str(SHARED), split="train"))
    counts = [sum(r.label == i for r in train) for i in range(4)]
    assert counts == [502, 480, 226, 1328]  # the README's train counts

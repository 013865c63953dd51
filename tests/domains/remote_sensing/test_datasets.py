"""Remote-sensing data sets: Karpathy presets, scene labels, class folders / CSVs, torchgeo."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from domainclip.core.data.sources import DataSourceConfig, load_records
from domainclip.domains.remote_sensing.datasets import (NO_SCENE_CLASS, RSICD, RSITMD, SceneDataset, SydneyCaptions,
                                                        TorchGeoScenes, UCMCaptions, preset_source)

from ...conftest import shared_data_root
from .make_fake_data import SCENES, write_karpathy_set, write_label_csv, write_scene_folders, write_torchgeo_ucmerced


def torchgeo_usable() -> bool:
    try:
        import torchgeo.datasets  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def rsicd(tmp_path: Path) -> Path:
    write_karpathy_set(tmp_path / "rsicd", per_class=2, numeric=3)
    return tmp_path / "rsicd"


def test_rsicd_preset_reads_the_folder_like_the_core_karpathy_reader(rsicd: Path) -> None:
    via_preset = load_records(DataSourceConfig(format="rsicd", path=str(rsicd), split="train"))
    via_core = load_records(DataSourceConfig(format="karpathy", path=str(rsicd / "dataset_rsicd.json"), split="train"))
    assert [(r.image, r.captions) for r in via_preset] == [(r.image, r.captions) for r in via_core]
    assert len(via_preset) == 2 * len(SCENES) + 3  # labelled + numeric-named images
    assert all(Path(r.image).parent.name == "RSICD_images" and Path(r.image).is_file() for r in via_preset)
    assert via_preset.class_names == []  # captions only


def test_rsicd_scenes_leave_out_and_count_images_without_a_class(rsicd: Path) -> None:
    scenes = load_records(DataSourceConfig(format="rsicd_scenes", path=str(rsicd), split="test"))
    assert len(scenes) == 2 * len(SCENES)
    left_out = [item for item, reason in scenes.skipped if reason == NO_SCENE_CLASS]
    assert len(left_out) == 3 and all(Path(p).stem.isdigit() for p in left_out)
    # all 30 RSICD classes are numbered (curated mapping), so indices match the real data set
    assert len(scenes.class_names) == 30
    assert scenes.class_names[scenes.raw_class_names.index("denseresidential")] == "dense residential area"
    for record in scenes:
        assert scenes.raw_class_names[record.label] == Path(record.image).stem.rsplit("_", 1)[0]


def test_scene_shots_and_limit_apply_after_unlabelled_images_are_gone(rsicd: Path) -> None:
    records = load_records(DataSourceConfig(format="rsicd_scenes", path=str(rsicd), split="train", shots=1, shot_seed=3))
    assert sorted(r.label for r in records) == sorted({r.label for r in records}) and len(records) == len(SCENES)


def test_other_caption_presets_find_their_files(tmp_path: Path) -> None:
    write_karpathy_set(tmp_path / "ucm", json_name="dataset.json", image_dir="imgs", per_class=1, numeric=0, ext=".tif")
    write_karpathy_set(tmp_path / "sydney", json_name="dataset.json", image_dir="imgs", per_class=1, numeric=0)
    write_karpathy_set(tmp_path / "rsitmd", json_name="dataset_RSITMD.json", image_dir="images", per_class=1, numeric=1)
    ucm = UCMCaptions(str(tmp_path / "ucm"), split="train")
    sample = ucm[0]
    assert sample["image"].shape == (3, 40, 40) and 0.0 <= float(sample["image"].min()) <= float(sample["image"].max()) <= 1.0
    assert sample["captions"][0] == "many planes are parked near a long runway" and sample["label"] == -1
    assert len(SydneyCaptions(str(tmp_path / "sydney"), split="test")) == len(SCENES)
    rsitmd = RSITMD(str(tmp_path / "rsitmd"), split="train", scenes=True)
    assert rsitmd.class_names == ["airport", "dense residential area", "forest"]  # normalised, no curated table
    assert len(rsitmd) == len(SCENES)


def test_missing_data_and_download_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset_rsicd\.json.*config key 'path'"):
        RSICD(str(tmp_path), split="train")
    with pytest.raises(NotImplementedError, match="no automatic download"):
        RSICD(str(tmp_path), download=True)
    with pytest.raises(ValueError, match="no sydney_captions_scenes format"):
        preset_source("sydney_captions", str(tmp_path), scenes=True)


def test_scene_folders_and_label_csv_normalise_names_and_use_overhead_prompts(tmp_path: Path) -> None:
    folders = load_records(DataSourceConfig(format="scene_folders", path=str(write_scene_folders(tmp_path / "f"))))
    csv_set = load_records(DataSourceConfig(format="scene_label_csv", path=str(write_label_csv(tmp_path / "c"))))
    for records in (folders, csv_set):
        assert records.class_names == ["airport", "dense residential area", "forest"]
        assert records.raw_class_names == ["airport", "denseresidential", "forest"]
        dense = next(r for r in records if r.label == 1)
        assert dense.captions[0] == "an aerial image of a dense residential area."
    custom = load_records(DataSourceConfig(format="scene_folders", path=str(tmp_path / "f"),
                                           class_names={"forest": "woodland"}, templates=["{} from above"]))
    assert custom.class_names[2] == "woodland" and custom.records[-1].captions == ["woodland from above"]


def test_scene_dataset_samples_and_unlabelled_count(rsicd: Path) -> None:
    dataset = SceneDataset(DataSourceConfig(format="karpathy", path=str(rsicd / "dataset_rsicd.json"),
                                            split="train", label_key="@filename_prefix"))
    assert len(dataset) == 2 * len(SCENES) and sum(r == "no label" for _, r in dataset.skipped) == 3
    sample = dataset[0]
    assert sample["class_name"] == dataset.class_names[sample["label"]] and sample["image"].shape[0] == 3
    with pytest.raises(ValueError, match="has no classes"):
        SceneDataset(DataSourceConfig(format="rsicd", path=str(rsicd)))


@pytest.mark.skipif(not torchgeo_usable(), reason="torchgeo (extra 'geo') is not installed or not importable")
def test_torchgeo_ucmerced_maps_onto_kit_samples_and_records(tmp_path: Path) -> None:
    root = write_torchgeo_ucmerced(tmp_path / "ucm")
    dataset = TorchGeoScenes("ucmerced", str(root), split="train")
    assert dataset.class_names == ["agricultural land", "dense residential area", "tennis court"]
    assert len(dataset) == 6
    sample = dataset[0]
    assert sample["image"].shape == (3, 256, 256) and float(sample["image"].max()) <= 1.0  # torchgeo resizes to 256
    assert sample["class_name"] == dataset.class_names[sample["label"]]
    records = load_records(DataSourceConfig(format="torchgeo_ucmerced", path=str(root), split="test"))
    assert len(records) == 6 and records.class_names == dataset.class_names
    assert records[0].captions[0] == "an aerial image of a agricultural land."
    renamed = load_records(DataSourceConfig(format="torchgeo_ucmerced", path=str(root), split="test",
                                            class_names={"agricultural": "farm fields"}))
    assert renamed.class_names[0] == "farm fields" and renamed[0].captions[0] == "an aerial image of a farm fields."
    with pytest.raises(ValueError, match=r"class_names keys \['farm'\] are not classes of ucmerced"):
        load_records(DataSourceConfig(format="torchgeo_ucmerced", path=str(root), class_names={"farm": "x"}))
    with pytest.raises(FileNotFoundError, match="UCMerced not found"):
        TorchGeoScenes("ucmerced", str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="valid: \\['eurosat', 'resisc45', 'ucmerced'\\]"):
        TorchGeoScenes("eurosat2", str(root))


def test_torchgeo_missing_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_torchgeo(name: str, *args: object, **kwargs: object):  # noqa: ANN202
        if name.startswith("torchgeo"):
            raise ImportError("No module named 'torchgeo'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchgeo)
    with pytest.raises(ImportError, match=r"pip install 'domainclip\[geo\]'"):
        TorchGeoScenes("ucmerced", "anywhere")


@pytest.mark.shared_data
def test_real_rsicd_scene_counts() -> None:
    root = shared_data_root() / "remote_sensing" / "rsicd"
    if not (root / "dataset_rsicd.json").is_file():
        pytest.skip(f"RSICD not found under {root}")
    scenes = load_records(DataSourceConfig(format="rsicd_scenes", path=str(root)))
    assert len(scenes) == 10000 and len(scenes.class_names) == 30
    assert sum(reason == NO_SCENE_CLASS for _, reason in scenes.skipped) == 921

"""CT: MONAI loading, HU windows, slices, 2.5D, aggregation, organ captions and labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domainclip.core.data.sources import DataSourceConfig, load_records
from domainclip.domains.medical.ct import (
    aggregate_scores,
    axial_slice,
    organ_caption,
    organs_in_slice,
    sample_slices,
    slab_25d,
    window,
    window_channels,
)
from domainclip.domains.medical.privacy import CACHE_ENV

from .make_fake_data import PHI_STRINGS, write_ct_series, write_ct_set

from ...conftest import shared_data_root  # noqa: E402

SHARED = shared_data_root() / "medical" / "ct_totalsegmentator"


@pytest.fixture
def medical_io():
    pytest.importorskip("monai", reason="MONAI (extra 'medical') is not installed")
    pytest.importorskip("nibabel", reason="nibabel (extra 'medical') is not installed")


def test_hu_windows_and_channels() -> None:
    hu = np.array([[-1350.0, -600.0, 150.0]])
    np.testing.assert_allclose(window(hu, "lung"), [[0.0, 0.5, 1.0]])
    np.testing.assert_allclose(window(hu, (50.0, 200.0)), [[0.0, 0.0, 1.0]])
    channels = window_channels(hu)
    assert channels.shape == (3, 1, 3)
    np.testing.assert_allclose(channels[1], window(hu, "mediastinum"))
    with pytest.raises(ValueError, match="unknown HU window 'lungs'"):
        window(hu, "lungs")


def test_slices_sampling_25d_and_aggregation() -> None:
    volume = np.arange(4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5) * 0 + np.arange(5)[None, None, :] * 100 - 200
    slab = slab_25d(volume, 0, (0.0, 800.0), neighbours=1)
    assert slab.shape == (3, 3, 4)
    np.testing.assert_allclose(slab[:, 0, 0], [(-200 + 400) / 800, (-200 + 400) / 800, (-100 + 400) / 800])  # edge repeated
    assert axial_slice(volume, 2).shape == (3, 4)
    assert sample_slices(10, stride=3) == [0, 3, 6, 9] and sample_slices(10, count=3) == [0, 4, 9]
    mask = np.zeros((2, 2, 10), bool)
    mask[0, 0, 4:7] = True
    assert sample_slices(10, mask=mask) == [4, 5, 6]
    scores = [0.1, 0.8, 0.5]
    assert aggregate_scores(scores) == 0.8 and aggregate_scores(scores, "mean") == pytest.approx(0.4666, abs=1e-3)
    assert aggregate_scores(scores, "topk_mean", k=2) == pytest.approx(0.65)
    assert aggregate_scores(scores, "noisy_or") == pytest.approx(1 - 0.9 * 0.2 * 0.5)
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        aggregate_scores(scores, "median")


def test_organ_captions() -> None:
    plane = np.array([[0, 5, 5], [2, 2, 0]])
    assert organs_in_slice(plane, {2: "kidney_right", 5: "liver"}) == ["kidney_right", "liver"]
    assert organ_caption(["liver", "kidney_right", "vertebrae_L1"]) == \
        "an axial CT slice showing liver, right kidney and L1 vertebra."
    assert organ_caption([]) == "an axial CT slice showing no labelled organ."


def test_ct_slices_format_labels_captions_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, medical_io) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    manifest = write_ct_set(tmp_path / "ct", depth=8)
    records = load_records(DataSourceConfig(format="ct_slices", path=str(manifest), label_key="liver"))
    assert len(records) == 8 and records.class_names == ["no liver", "the liver"]
    # RAS orientation keeps the NIfTI's z order here (diagonal affine): liver in slices 0..3
    assert [r.label for r in records] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert records[0].captions[0] == "an axial CT slice showing liver and right kidney."
    assert records[7].captions[0] == "an axial CT slice showing right kidney."
    from PIL import Image

    with Image.open(records[0].image) as image:
        assert image.mode == "RGB" and image.size == (24, 24)
        pixels = np.asarray(image)
    assert not np.array_equal(pixels[..., 0], pixels[..., 1])  # different windows per channel
    slabs = load_records(DataSourceConfig(format="ct_slices_25d", path=str(manifest), label_key="liver"))
    assert len(slabs) == 8 and slabs[0].image != records[0].image
    from domainclip.domains.medical.ct import load_volume

    resampled = load_volume(tmp_path / "ct" / "ct.nii.gz", spacing=(4.0, 4.0, 3.0))
    assert resampled.array.shape == (12, 12, 8) and resampled.spacing == pytest.approx((4.0, 4.0, 3.0))
    labels = load_volume(tmp_path / "ct" / "seg.nii.gz", spacing=(4.0, 4.0, 3.0), labels=True)
    assert set(np.unique(labels.array)) == {0, 2, 5}  # nearest neighbour: no blended label ids
    from domainclip.domains.medical.datasets import CTSlices

    dataset = CTSlices(manifest, organ="liver")
    sample = dataset[0]
    assert sample["image"].shape == (3, 24, 24) and sample["label"] == 1 and dataset.class_names == records.class_names
    assert float(sample["image"].max()) <= 1.0 and sample["path"] == records[0].image
    with pytest.raises(ValueError, match="organ 'spleen' .*not in the label names"):
        load_records(DataSourceConfig(format="ct_slices", path=str(manifest), label_key="spleen"))


def test_dicom_series_through_monai_drops_the_header(tmp_path: Path, medical_io) -> None:
    if not (SHARED / "example_ct_dicom").is_dir():
        pytest.skip("shared TotalSegmentator DICOM series absent")
    from domainclip.domains.medical.ct import Volume, load_volume

    volume = load_volume(SHARED / "example_ct_dicom")
    assert isinstance(volume, Volume) and volume.array.shape == (512, 512, 20)
    assert volume.array.min() == pytest.approx(-1024.0)  # rescale intercept applied: HU
    assert volume.spacing[:2] == pytest.approx((0.9765625, 0.9765625))
    assert set(vars(volume)) == {"array", "affine", "spacing"}


def test_written_dicom_series_gives_hu_in_slice_order_and_no_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     medical_io) -> None:
    pytest.importorskip("pydicom", reason="pydicom (extra 'medical') is not installed")
    from domainclip.domains.medical.ct import load_volume

    series = write_ct_series(tmp_path / "PIDX7731_series", depth=4)
    volume = load_volume(series)
    assert volume.array.shape == (16, 16, 4)
    np.testing.assert_allclose(volume.array[3, 5, :], [0.0, 100.0, 200.0, 300.0])  # HU, ordered by position
    assert volume.spacing == pytest.approx((0.8, 0.8, 2.5))
    assert not [s for s in PHI_STRINGS if s in repr(vars(volume))]
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "m.csv").write_text("image\nPIDX7731_series\n")
    records = load_records(DataSourceConfig(format="ct_slices", path=str(tmp_path / "m.csv")))
    assert len(records) == 4 and not [s for s in PHI_STRINGS if s in repr(records)]
    assert records[0].captions == ["an axial CT slice."]
    (tmp_path / "m.csv").write_text("image\nPIDX7731_missing\n")
    with pytest.raises(FileNotFoundError, match=r"m.csv:2: CT volume not found: volume:[0-9a-f]{32}$"):
        load_records(DataSourceConfig(format="ct_slices", path=str(tmp_path / "m.csv")))
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            assert not [s for s in PHI_STRINGS if s.encode() in path.read_bytes()], path


def test_ct_label_map_needs_names_for_every_captioned_organ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           medical_io) -> None:
    """Organ captions come from ``label_names``: without them the kit must fail, not caption "5, 2"."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    manifest = write_ct_set(tmp_path / "ct", depth=4)
    manifest.write_text("image,label_map\nct.nii.gz,seg.nii.gz\n")  # no label_names column
    with pytest.raises(KeyError, match=r"manifest.csv:2: a 'label_map' needs a 'label_names' column .*"
                                       r"columns: \['image', 'label_map'\]"):
        load_records(DataSourceConfig(format="ct_slices", path=str(manifest)))
    manifest.write_text("image,label_map,label_names\nct.nii.gz,seg.nii.gz,\n")  # column present, cell empty
    with pytest.raises(ValueError, match=r"manifest.csv:2: 'label_names' is empty; a 'label_map' needs its organ"):
        load_records(DataSourceConfig(format="ct_slices", path=str(manifest)))
    (tmp_path / "ct" / "liver_only.json").write_text('{"5": "liver"}')  # the kidney (id 2) has no name
    manifest.write_text("image,label_map,label_names\nct.nii.gz,seg.nii.gz,liver_only.json\n")
    with pytest.raises(ValueError, match=r"manifest.csv:2: label id\(s\) \[2\] of the label map \(axial slice 0\) "
                                         r"have no name"):
        load_records(DataSourceConfig(format="ct_slices", path=str(manifest)))
    manifest.write_text("image,label_map,label_names\nct.nii.gz,seg.nii.gz,labels.json\n")
    records = load_records(DataSourceConfig(format="ct_slices", path=str(manifest)))
    assert [r.captions[0] for r in records] == ["an axial CT slice showing liver and right kidney."] * 2 + [
        "an axial CT slice showing right kidney."] * 2


@pytest.mark.parametrize("block", ["6:10", "9:12"])
def test_ct_slice_block_past_the_volume_end_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        medical_io, block: str) -> None:
    """A block overlapping (6:10) or beyond (9:12) an 8-slice volume must not quietly give fewer slices."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / f"{PHI_STRINGS[2]}_scan"  # a folder named like a patient ID
    write_ct_set(folder, depth=8)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,label_map,label_names,slices\n{folder.name}/ct.nii.gz,{folder.name}/seg.nii.gz,"
                        f"{folder.name}/labels.json,0:8\n{folder.name}/ct.nii.gz,{folder.name}/seg.nii.gz,"
                        f"{folder.name}/labels.json,{block}\n")
    with pytest.raises(ValueError, match=rf"m.csv:3: slices {block} reach past the end of volume:[0-9a-f]{{32}}, "
                                         r"which has 8 axial slices \(valid blocks lie within 0:8\)") as error:
        load_records(DataSourceConfig(format="ct_slices", path=str(manifest)))
    assert not [s for s in PHI_STRINGS if s in str(error.value)]
    manifest.write_text(f"image,slices\n{folder.name}/ct.nii.gz,3:8\n")  # a block ending at the last slice is fine
    assert len(load_records(DataSourceConfig(format="ct_slices", path=str(manifest)))) == 5

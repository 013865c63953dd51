"""Chest X-ray: DICOM decoding, views, label CSVs, reports, prompts, augmentation, zero-shot AUROC."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from domainclip.core.backbones.base import PreprocessConfig
from domainclip.core.data.sources import DataSourceConfig, load_records
from domainclip.core.data.transforms import build_train_transform
from domainclip.domains.medical.labels import read_label_csv
from domainclip.domains.medical.prompts import clinical_name, finding_phrase, findings_caption
from domainclip.domains.medical.reports import (clean_text, parse_report, read_iu_reports, report_from_columns,
                                                section_counts)
from domainclip.domains.medical.transforms import CXRAugment, CXRAugmentd
from domainclip.domains.medical.privacy import CACHE_ENV

from .make_fake_data import chest_pixels, write_dicom

from ...conftest import shared_data_root  # noqa: E402

SHARED = shared_data_root() / "medical"


@pytest.fixture
def pydicom():
    return pytest.importorskip("pydicom", reason="pydicom (extra 'medical') is not installed")


def test_window_rescale_and_monochrome1_inversion(tmp_path: Path, pydicom) -> None:
    from domainclip.domains.medical.dicom import read_dicom

    pixels = np.array([[0, 1000], [2000, 4095]])
    path = write_dicom(tmp_path / "a.dcm", pixels, window=(1000.0, 1001.0))
    grey, meta = read_dicom(path)
    # linear DICOM window: center 1000, width 1001 -> [499.5 .. 1500.5] maps to [0, 1]
    np.testing.assert_allclose(grey, [[0.0, (1000 - 499.5) / 1000], [1.0, 1.0]], atol=1e-6)
    assert meta["view"] == "PA" and meta["BitsStored"] == 12 and grey.dtype == np.float32
    inverted, _ = read_dicom(write_dicom(tmp_path / "b.dcm", pixels, photometric="MONOCHROME1", window=(1000.0, 1001.0)))
    np.testing.assert_allclose(inverted, 1.0 - grey, atol=1e-6)
    # no window in the file: min..max after the modality LUT (slope 2, intercept -100)
    plain, _ = read_dicom(write_dicom(tmp_path / "c.dcm", pixels, slope=2.0, intercept=-100.0))
    np.testing.assert_allclose(plain, pixels / 4095.0, atol=1e-6)
    forced, _ = read_dicom(path, window=(2047.5, 4096.0))  # an explicit window wins over the file's
    np.testing.assert_allclose(forced, pixels / 4095.0, atol=1e-3)


def test_voi_lut_sequence_is_applied(tmp_path: Path, pydicom) -> None:
    from domainclip.domains.medical.dicom import read_dicom

    lut = (np.sqrt(np.arange(4096) / 4095.0) * 65535).astype(int)  # a non-linear 16-bit VOI LUT
    pixels = np.array([[0, 1024], [2048, 4095]])
    grey, _ = read_dicom(write_dicom(tmp_path / "lut.dcm", pixels, window=(10.0, 5.0), voi_lut=lut))
    np.testing.assert_allclose(grey, lut[pixels] / 65535.0, atol=1e-6)  # the LUT wins over the window


@pytest.mark.parametrize(("slope", "intercept", "first"), [(1.0, -1024.0, -1024), (2.0, 10.0, 12)])
def test_voi_lut_indexes_rescaled_values_like_pydicom(tmp_path: Path, pydicom, slope: float, intercept: float,
                                                      first: int) -> None:
    """PS3.3 C.11.2: the VOI LUT maps the modality-LUT output (after slope / intercept), not stored values."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from domainclip.domains.medical.dicom import decode_dicom

    lut = np.array([0, 32768, 48824, 65535])
    pixels = np.array([[0, 1], [2, 3]])
    dataset = pydicom.dcmread(write_dicom(tmp_path / "ct.dcm", pixels, slope=slope, intercept=intercept, voi_lut=lut))
    # first mapped value in rescaled units (signed: LUT Descriptor is US or SS)
    dataset.VOILUTSequence[0].add_new(0x00283002, "SS", [len(lut), first, 16])
    with warnings.catch_warnings():  # pydicom notes that the rescaled values are floats
        warnings.simplefilter("ignore", UserWarning)
        reference = apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset) / 65535.0
    grey = decode_dicom(dataset)
    np.testing.assert_allclose(grey, reference, atol=1e-6)
    rescaled = pixels * slope + intercept
    np.testing.assert_allclose(grey, lut[np.clip(rescaled - first, 0, 3).astype(int)] / 65535.0, atol=1e-6)
    if first == -1024:
        np.testing.assert_allclose(grey.ravel(), [0.0, 0.5, 48824 / 65535, 1.0], atol=1e-5)


def test_eight_bit_voi_lut_stored_as_ow_words(tmp_path: Path, pydicom) -> None:
    from domainclip.domains.medical.dicom import read_dicom

    lut = (np.arange(4096) * 255 // 4095)[::-1].copy()  # 8-bit entries, inverted, one per OW word
    pixels = np.array([[0, 1024], [2048, 4095]])
    path = write_dicom(tmp_path / "lut8.dcm", pixels, voi_lut=lut, voi_lut_bits=8)
    assert pydicom.dcmread(path).VOILUTSequence[0]["LUTData"].VR == "OW"
    grey, _ = read_dicom(path)
    np.testing.assert_allclose(grey, lut[pixels] / 255.0, atol=1e-6)  # scaled by the LUT's 8 bits, not 16
    as_us = write_dicom(tmp_path / "lut8_us.dcm", pixels, voi_lut=lut, voi_lut_bits=8, voi_lut_vr="US")
    assert pydicom.dcmread(as_us).VOILUTSequence[0]["LUTData"].VR == "US"
    np.testing.assert_allclose(read_dicom(as_us)[0], lut[pixels] / 255.0, atol=1e-6)  # a US value list too


def test_view_filter_and_cached_rendering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pydicom) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / "data"
    for name, view in (("pa", "PA"), ("ap", "AP"), ("lat", "LL"), ("none", "")):
        write_dicom(folder / f"{name}.dcm", chest_pixels(1, True), view=view)
    (folder / "m.csv").write_text("image,caption\n" + "".join(f"{n}.dcm,x\n" for n in ("pa", "ap", "lat", "none")))
    counts = {fmt: len(load_records(DataSourceConfig(format=fmt, path=str(folder / "m.csv"))))
              for fmt in ("cxr_dicom", "cxr_dicom_frontal", "cxr_dicom_pa", "cxr_dicom_lateral")}
    assert counts == {"cxr_dicom": 4, "cxr_dicom_frontal": 2, "cxr_dicom_pa": 1, "cxr_dicom_lateral": 1}
    pngs = sorted((tmp_path / "cache" / "cxr").glob("*.png"))
    assert len(pngs) == 4  # rendered once, reused by every later load
    from PIL import Image

    with Image.open(pngs[0]) as image:
        assert image.mode == "L" and image.size == (32, 32) and not image.text


def test_burned_in_annotation_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pydicom) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    write_dicom(tmp_path / "a.dcm", chest_pixels(1, True), burned_in=True)
    (tmp_path / "m.csv").write_text("image,caption\na.dcm,x\n")
    records = load_records(DataSourceConfig(format="cxr_dicom", path=str(tmp_path / "m.csv")))
    assert len(records) == 0 and len(records.skipped) == 1
    assert "BurnedInAnnotation" in records.skipped[0][1]


CHEXPERT = """Path,Sex,Cardiomegaly,Edema,Pleural Effusion
a.png,F,1,,-1
b.png,M,0,-1,
c.png,F,-1,1.0,0
"""


def test_label_csv_uncertainty_policies(tmp_path: Path) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text(CHEXPERT)
    ones = read_label_csv(csv, uncertain="ones")
    assert ones.findings == ["Cardiomegaly", "Edema", "Pleural Effusion"]
    np.testing.assert_array_equal(ones.targets, [[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(read_label_csv(csv, uncertain="zeros").targets, [[1, 0, 0], [0, 0, 0], [0, 1, 0]])
    ignore = read_label_csv(csv, uncertain="ignore", blank="ignore").targets
    assert np.isnan(ignore[0, 1]) and np.isnan(ignore[0, 2]) and np.isnan(ignore[2, 0]) and ignore[2, 1] == 1
    csv.write_text(CHEXPERT.replace("-1.0", "maybe").replace("1.0", "maybe"))
    with pytest.raises(ValueError, match=r"train.csv:4 column 'Edema'.*'maybe' is not 1, 0, -1 or blank"):
        read_label_csv(csv)
    with pytest.raises(ValueError, match="uncertainty policy must be one of"):
        read_label_csv(csv, uncertain="half")


def test_chexpert_format_captions_and_binary_labels(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(CHEXPERT)
    records = load_records(DataSourceConfig(format="chexpert", path=str(tmp_path / "train.csv")))
    assert records[0].captions[0] == "a chest x-ray showing cardiomegaly and a pleural effusion."
    assert records[1].captions[0] == "a chest x-ray showing pulmonary edema."
    edema = load_records(DataSourceConfig(format="chexpert_ignore", path=str(tmp_path / "train.csv"),
                                          label_key="Edema"))
    assert edema.class_names == ["no pulmonary edema", "pulmonary edema"]
    assert [r.label for r in edema] == [0, 1] and "unknown under policy 'ignore'" in edema.skipped[0][1]


def test_report_sections_and_deidentification_marks() -> None:
    text = ("INDICATION: XXXX-year-old with cough.\nFINDINGS: Heart size is normal. There are no XXXX of a "
            "pleural effusion. Lungs are clear..\nIMPRESSION: 1. No acute cardiopulmonary process. 2. Stable XXXX.")
    report = parse_report(text)
    assert report.findings == "Heart size is normal. Lungs are clear."
    assert report.impression == "No acute cardiopulmonary process."
    assert "indication" not in report.sections  # its only sentence held a mark
    assert report.captions() == [report.impression, report.findings]
    masked = parse_report(text, deid_policy="mask")
    assert masked.impression == "No acute cardiopulmonary process. Stable [redacted]."
    assert clean_text("Normal chest x-XXXX.", "keep") == "Normal chest x-XXXX."
    assert clean_text("Seen on ___ study. Lungs clear.") == "Lungs clear."
    assert section_counts([report, parse_report("CONCLUSION: normal."), parse_report("")]) == {
        "reports": 3, "findings": 1, "impression": 2, "both": 1, "neither": 1}
    with pytest.raises(ValueError, match="deid_policy must be one of"):
        parse_report(text, deid_policy="erase")


@pytest.mark.skipif(not (SHARED / "iu_xray_reports" / "reports.csv").is_file(), reason="shared IU reports absent")
def test_iu_reports_format_on_real_reports() -> None:
    records = load_records(DataSourceConfig(format="iu_reports", path=str(SHARED / "iu_xray_reports" / "reports.csv")))
    assert len(records) + len(records.skipped) == 3826
    assert not any("XXXX" in c for r in records for c in r.captions)
    # the columns are cleaned whole: a header word inside a column (CXR206's findings start
    # "Chest  Comparison: ...") must not cut the findings short
    for row, report in read_iu_reports(SHARED / "iu_xray_reports" / "reports.csv"):
        assert report.findings == clean_text(row["findings"]) and report.impression == clean_text(row["impression"])


def test_iu_report_columns_are_not_resplit_at_header_words(tmp_path: Path) -> None:
    findings = ("Chest  Comparison: There is a 2.6 cm masslike density over the lingula. No pleural effusion is seen. "
                "Pelvis and left hip There is an impacted fracture. History: none given. Femur Intact.")
    impression = "Chest. 1. Left lower lobe nodule. Findings: stable. Conclusion: fracture left hip."
    report = report_from_columns(findings, impression)
    assert report.findings == ("Chest Comparison: There is a 2.6 cm masslike density over the lingula. No pleural "
                               "effusion is seen. Pelvis and left hip There is an impacted fracture. History: none "
                               "given. Femur Intact.")
    assert report.impression == "Chest. Left lower lobe nodule. Findings: stable. Conclusion: fracture left hip."
    assert report.sections == {"findings": report.findings, "impression": report.impression}
    assert report.captions() == [report.impression, report.findings]
    assert report_from_columns("", "No XXXX seen.").sections == {}  # nothing left: no empty sections
    (tmp_path / "reports.csv").write_text(f'report_id,image_path,findings,impression\nCXR206,a.png,"{findings}",'
                                          f'"{impression}"\n')
    records = load_records(DataSourceConfig(format="iu_reports", path=str(tmp_path / "reports.csv")))
    assert records[0].captions == [report.impression, report.findings]


def test_clinical_names_and_prompts() -> None:
    assert clinical_name("Pleural_Effusion") == clinical_name("effusion") == "a pleural effusion"
    assert finding_phrase("Pneumothorax") == "pneumothorax"
    assert clinical_name("Hiatal hernia") == "hiatal hernia"
    assert findings_caption([]) == "a chest x-ray showing no acute cardiopulmonary abnormality."


def test_cxr_augmentation_is_grey_unflipped_and_registered() -> None:
    preprocess = PreprocessConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    transform = build_train_transform(preprocess, {"name": "cxr", "max_rotation": 0.0, "contrast": 0.0,
                                                   "brightness": 0.0, "gamma": 0.0}, scale=(1.0, 1.0))
    assert isinstance(transform, CXRAugmentd)
    grey = np.zeros((16, 16), dtype=np.float32)
    grey[:, :4] = 1.0  # bright band on the image's left
    torch.manual_seed(0)
    out = transform({"image": (grey * 255).astype(np.uint8), "caption": "x"})["image"]
    assert out.shape == (3, 16, 16)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # grey: identical channels
    for seed in range(20):  # never flipped by default, the left stays bright
        torch.manual_seed(seed)
        assert transform(grey)[0, :, :3].mean() > 1.5
    flipping = CXRAugment(16, (0.5,) * 3, (0.25,) * 3, scale=(1.0, 1.0), max_rotation=0, contrast=0, brightness=0,
                          gamma=0, hflip=1.0)
    assert flipping(grey)[0, :, -3:].mean() > 1.5
    wrapped = CXRAugmentd(flipping)
    assert wrapped({"image": grey, "caption": "opacity"})["image"][0, :, -3:].mean() > 1.5
    kept = wrapped({"image": grey, "caption": "opacity in the LEFT lower lobe"})
    assert kept["image"][0, :, :3].mean() > 1.5 and kept["caption"] == "opacity in the LEFT lower lobe"
    with pytest.raises(ValueError, match="not a registered transform"):
        build_train_transform(preprocess, {"name": "cxrr"})
    with pytest.raises(ValueError, match="max_rotation must be in"):
        build_train_transform(preprocess, {"name": "cxr", "max_rotation": 90})


def test_clahe_raises_local_contrast() -> None:
    pytest.importorskip("cv2", reason="OpenCV is not installed")
    from domainclip.domains.medical.transforms import apply_clahe

    rng = np.random.default_rng(0)
    flat = 0.5 + 0.02 * rng.standard_normal((64, 64)).astype(np.float32)
    assert apply_clahe(flat, 4.0).std() > 2 * flat.std()


def test_zeroshot_findings_auroc_per_finding(tmp_path: Path) -> None:
    from domainclip.core.backbones.factory import ModelConfig, create_backbone
    from domainclip.domains.medical.datasets import CheXpert
    from domainclip.domains.medical.zeroshot import evaluate_findings
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in "abc":
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "train.csv").write_text(CHEXPERT)
    dataset = CheXpert(tmp_path / "train.csv", uncertain="ignore")
    sample = dataset[2]
    assert sample["image"].shape == (3, 24, 24) and torch.isnan(sample["targets"][0]) and sample["targets"][1] == 1
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit"))
    result = evaluate_findings(model, dataset.multilabel_records(), dataset.findings, batch_size=2)
    assert set(result["auroc"]) == {"Cardiomegaly", "Edema", "Pleural Effusion"}
    assert result["label_counts"]["Cardiomegaly"] == {"positive": 1, "negative": 1, "unknown": 1}
    assert result["auroc"]["Pleural Effusion"] is None  # only negatives known: no AUROC
    assert result["auroc"]["Cardiomegaly"] in (0.0, 1.0)  # one positive vs one negative
    assert result["mean_auroc"] is not None and not math.isnan(result["mean_auroc"])
    with pytest.raises(NotImplementedError, match="no automatic download"):
        CheXpert(tmp_path / "train.csv", download=True)


def test_iu_reports_dataset_class(tmp_path: Path) -> None:
    from domainclip.domains.medical.datasets import IUXrayReports

    (tmp_path / "reports.csv").write_text(
        "report_id,image_path,findings,impression\nCXR1,img/1.png,Lungs clear. No XXXX.,Normal chest x-XXXX.\n"
        "CXR2,img/2.png,,1. Small left effusion.\n")
    reports = IUXrayReports(tmp_path)
    assert len(reports) == 2
    first, second = reports[0], reports[1]
    assert first["findings"] == "Lungs clear." and first["impression"] == "" and first["captions"] == ["Lungs clear."]
    assert second["impression"] == "Small left effusion." and second["image_path"].endswith("img/2.png")
    assert IUXrayReports(tmp_path / "reports.csv", deid_policy="mask")[0]["impression"] == "Normal chest x-[redacted]."


def test_dicom_records_keep_groups_and_find_uid_named_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            pydicom) -> None:
    from domainclip.domains.medical.cxr import is_dicom

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    named = write_dicom(tmp_path / "a.dcm", chest_pixels(1, True))
    by_uid = tmp_path / "CT.1.3.12.2.1107.5.1.4.16573"  # series files are often named by UID
    by_uid.write_bytes(named.read_bytes())
    (tmp_path / "photo.1.png").write_bytes(b"\x89PNG not a dicom")
    assert is_dicom(by_uid) and not is_dicom(tmp_path / "photo.1.png")
    (tmp_path / "m.csv").write_text(f"image,caption,scan\na.dcm,x,s1\n{by_uid.name},y,s2\n")
    records = load_records(DataSourceConfig(format="cxr_dicom", path=str(tmp_path / "m.csv"), group_key="scan"))
    assert [r.group for r in records] == ["s1", "s2"] and all(r.image.endswith(".png") for r in records)


def test_chexpert_unknown_label_key_names_the_columns(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(CHEXPERT)
    with pytest.raises(KeyError, match=r"label_key 'Edemaa' is not a finding column .*'Edema'"):
        load_records(DataSourceConfig(format="chexpert", path=str(tmp_path / "train.csv"), label_key="Edemaa"))

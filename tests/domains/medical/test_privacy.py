"""Patient attributes of a DICOM never reach records, logs, caches, the run folder or the card."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("pydicom", reason="pydicom (extra 'medical') is not installed")

from domainclip.core import config as config_lib  # noqa: E402
from domainclip.core.cards import write_run_card  # noqa: E402
from domainclip.core.data.sources import DataSourceConfig, load_records  # noqa: E402
from domainclip.core.run_config import RunConfig  # noqa: E402
from domainclip.core.train import train  # noqa: E402
from domainclip.domains.medical.privacy import CACHE_ENV, check_no_phi, technical_metadata  # noqa: E402

from .make_fake_data import PHI, PHI_STRINGS, write_dicom, write_dicom_set  # noqa: E402


def leaks_in(folder: Path) -> list[str]:
    """``file: string`` for every PHI string found in any file (text or binary) under ``folder``."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in PHI_STRINGS if s.encode() in data or s.lower().encode() in data.lower()]
    return found


def test_technical_metadata_keeps_no_patient_attribute(tmp_path: Path) -> None:
    import pydicom

    from .make_fake_data import chest_pixels

    dataset = pydicom.dcmread(write_dicom(tmp_path / "x.dcm", chest_pixels(0, True), window=(100.0, 50.0)))
    meta = technical_metadata(dataset)
    assert meta["ViewPosition"] == "PA" and meta["BitsStored"] == 12 and meta["WindowWidth"] == 50.0
    text = json.dumps(meta)
    assert check_no_phi(dataset, text) == [] and not [s for s in PHI_STRINGS if s in text]
    assert check_no_phi(dataset, repr(dataset)) != []  # the check itself can fail


def test_records_name_dicoms_by_pseudonym_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "medical_cache"))
    manifest = write_dicom_set(tmp_path / "data")
    records = load_records(DataSourceConfig(format="cxr_dicom_frontal", path=str(manifest), label_key="label"))
    assert len(records) == 8  # the lateral view and the truncated file are left out
    reasons = dict(records.skipped)
    assert any(r.startswith(("cannot read DICOM", "cannot decode DICOM pixels")) for r in reasons.values()), reasons
    assert any(r.startswith("view LATERAL not in") for r in reasons.values())
    assert all(item.startswith("dicom:") for item in reasons)
    text = repr(records)
    assert [s for s in PHI_STRINGS if s in text] == [], text
    assert all(Path(r.image).parent.parent == tmp_path / "medical_cache" for r in records)


def test_training_run_card_and_caches_hold_no_patient_identifier(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "medical_cache"))
    monkeypatch.setenv("DOMAINCLIP_CACHE", str(tmp_path / "feature_cache"))
    manifest = write_dicom_set(tmp_path / "data")
    source = {"format": "cxr_dicom_frontal", "path": str(manifest), "label_key": "label",
              "templates": ["a chest x-ray showing {}."]}
    recipe = {
        "name": "cxr_privacy", "output_dir": str(tmp_path / "runs"),
        "model": {"kind": "open_clip", "name": "domainclip-tiny-vit"},
        "method": {"name": "projector", "init": "random", "cache_dir": str(tmp_path / "feature_cache")},
        "data": {"train": source, "batch_size": 4, "num_workers": 0, "max_bad_fraction": 0.5},
        "train": {"max_steps": 3, "lr": 1e-3, "precision": "no", "log_every": 1, "progress": False,
                  "tensorboard": False},
        "eval": [{"name": "cxr_zeroshot", "task": "zeroshot", "data": source, "batch_size": 4}],
    }
    with caplog.at_level(logging.DEBUG):
        result = train(config_lib.load(RunConfig, None, (), base=recipe))
        card = write_run_card(result.run_dir, domain="medical")
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics[0]["metrics"]["n_samples"] == 8
    skipped = json.loads((result.run_dir / "bad_inputs.json").read_text())["skipped_records"]
    assert len(skipped) == 2 and all(item["item"].startswith("dicom:") for item in skipped)
    assert "Not for clinical use" in card.read_text()
    assert list((tmp_path / "feature_cache").rglob("*.safetensors")), "the projector should have cached features"
    captured = capsys.readouterr()
    logs = caplog.text + captured.out + captured.err
    assert [s for s in PHI_STRINGS if s.lower() in logs.lower()] == []
    for folder in (result.run_dir, tmp_path / "feature_cache", tmp_path / "medical_cache"):
        assert leaks_in(folder) == [], folder
    # the test data does hold the identifiers (the check above could fail)
    assert leaks_in(tmp_path / "data")
    assert PHI["PatientID"] in str(manifest.read_text())


def test_jpeg_and_png_records_are_named_by_pseudonym_and_keep_their_pixels(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import numpy as np
    from PIL import Image

    from domainclip.core.data.bad_inputs import TooManyBadInputsError, check_paths_exist
    from domainclip.core.data.dataset import ImageTextDataset

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "medical_cache"))
    root = tmp_path / "CheXpert-v1.0"
    rows = ["Path,Cardiomegaly,Edema"]
    for number in range(3):  # CheXpert's layout: the patient's id in the folder name
        image = root / "train" / f"patient0004{number}" / "study1" / "view1_frontal.jpg"
        image.parent.mkdir(parents=True)
        Image.fromarray(np.full((24, 24), 40 * number, np.uint8)).save(image)
        rows.append(f"train/patient0004{number}/study1/view1_frontal.jpg,1,0")
    rows.append("train/patient00049/study1/view1_frontal.jpg,0,1")  # listed, but not on disk
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    records = load_records(DataSourceConfig(format="chexpert", path=str(root / "train.csv"), image_root=str(root)))
    assert len(records) == 4 and "patient0004" not in repr(records)
    assert all(Path(r.image).parent == tmp_path / "medical_cache" / "image" for r in records)
    for number, record in enumerate(records.records[:3]):  # the same file (a hard link here), the same pixels
        source = root / "train" / f"patient0004{number}" / "study1" / "view1_frontal.jpg"
        assert os.path.samefile(record.image, source)
    again = load_records(DataSourceConfig(format="chexpert", path=str(root / "train.csv"), image_root=str(root)))
    assert [r.image for r in again] == [r.image for r in records]  # stable names, nothing written twice
    assert len(list((tmp_path / "medical_cache" / "image").iterdir())) == 3
    # the missing image is reported under its pseudonym, in the up-front check and by the loader
    with pytest.raises(TooManyBadInputsError) as error:
        check_paths_exist([r.image for r in records], 0.1, "data.train", str(root), "data.train.image_root")
    assert "patient0004" not in str(error.value) and "1 of 4 image paths" in str(error.value)
    dataset = ImageTextDataset(records, lambda image: image, train=False)
    bad = dataset[3]["bad"]
    assert bad[0] == records.records[3].image and "patient0004" not in repr(bad)

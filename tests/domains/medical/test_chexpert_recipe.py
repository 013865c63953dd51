"""recipes/medical/cxr_chexpert_lora.yaml on a fake CheXpert-layout set of DICOMs (tiny model, CPU).

The DICOMs carry a patient name and ID; the run must train, evaluate each competition finding with
AUROC, count the uncertain labels it left out, and keep every identifier out of its folder.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("pydicom", reason="pydicom (extra 'medical') is not installed")

from domainclip.core import config as config_lib  # noqa: E402
from domainclip.core.run_config import RunConfig  # noqa: E402
from domainclip.core.train import train  # noqa: E402
from domainclip.domains.medical.privacy import CACHE_ENV  # noqa: E402
from domainclip.domains.medical.prompts import CHEXPERT_COMPETITION  # noqa: E402

from .make_fake_data import PHI, chest_pixels, write_dicom  # noqa: E402
from .test_privacy import leaks_in  # noqa: E402

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "medical" / "cxr_chexpert_lora.yaml"


def write_chexpert_split(folder: Path, name: str, count: int) -> Path:
    """``<name>.csv`` in the CheXpert layout with DICOM paths under a patient-ID folder.

    Image i shows a bright left half when i is even (its "Pleural Effusion" is 1); row 1 has an
    uncertain (-1) effusion and a blank edema, so U-Ignore leaves it out of the effusion task.
    """
    rows = []
    for i in range(count):
        path = write_dicom(folder / PHI["PatientID"] / f"study{i}" / f"{name}_{i}.dcm",
                           chest_pixels(i + (0 if name == "train" else 100), i % 2 == 0), window=(2000.0, 4000.0))
        effusion = "-1" if i == 1 else ("1" if i % 2 == 0 else "0")
        rows.append({"Path": str(path.relative_to(folder)), "Sex": "F", "Atelectasis": "0",
                     "Cardiomegaly": str(i % 3 == 0 and 1 or 0), "Consolidation": "0",
                     "Edema": "" if i == 1 else "0", "Pleural Effusion": effusion})
    manifest = folder / f"{name}.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_chexpert_recipe_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "medical_cache"))
    data = tmp_path / "chexpert"
    train_csv, valid_csv = write_chexpert_split(data, "train", 8), write_chexpert_split(data, "valid", 6)
    overrides = [f"output_dir={tmp_path / 'runs'}", f"data.train.path={train_csv}",
                 "model={kind: open_clip, name: domainclip-tiny-vit}", "data.batch_size=4", "data.num_workers=0",
                 "train.max_steps=2", "train.precision='no'", "train.progress=false", "train.tensorboard=false",
                 "train.log_every=1", "train.warmup_steps=0"]
    overrides += [f"eval.{i}.data.path={valid_csv}" for i in range(5)] + [f"eval.{i}.batch_size=8" for i in range(5)]
    cfg = config_lib.load(RunConfig, RECIPE, overrides)
    assert [t.data.label_key for t in cfg.eval] == CHEXPERT_COMPETITION
    assert cfg.data.augment["name"] == "cxr" and cfg.data.train.format == "chexpert"
    result = train(cfg)
    metrics = {m["dataset"]: m["metrics"] for m in json.loads((result.run_dir / "metrics.json").read_text())}
    effusion = metrics["chexpert_valid_pleural_effusion"]
    assert effusion["n_samples"] == 5  # 6 studies, one uncertain effusion left out (U-Ignore)
    assert effusion["n_skipped_records"] == 1
    assert 0.0 <= effusion["auroc"] <= 1.0
    assert metrics["chexpert_valid_cardiomegaly"]["n_samples"] == 6
    assert "auroc" not in metrics["chexpert_valid_atelectasis"]  # every study negative: AUROC undefined, not reported
    assert (result.run_dir / "model" / "trainable.safetensors").is_file()
    assert leaks_in(result.run_dir) == [] and leaks_in(tmp_path / "medical_cache") == []
    assert leaks_in(data)  # the data do carry the identifiers, so the check above can fail

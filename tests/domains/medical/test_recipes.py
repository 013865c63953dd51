"""Every recipes/medical/*.yaml trains a few steps on CPU (tiny open_clip, fake data)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from domainclip.core import config as config_lib
from domainclip.core.run_config import RunConfig
from domainclip.core.train import train
from domainclip.domains.medical.privacy import CACHE_ENV

from .make_fake_data import write_ct_set

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "medical"
CXR = ["cxr_pneumonia_lora", "cxr_pneumonia_coop", "cxr_pneumonia_linear_probe"]
COMMON = ["model={kind: open_clip, name: domainclip-tiny-vit}", "data.batch_size=4", "data.num_workers=0",
          "train.max_steps=2", "train.precision='no'", "train.progress=false", "train.tensorboard=false",
          "train.log_every=1", "train.warmup_steps=0", "eval.0.batch_size=8"]


def test_recipe_list() -> None:
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted([*CXR, "ct_organs_lora", "cxr_chexpert_lora"])


def write_pneumonia_folders(root: Path, per_class: int = 4) -> Path:
    """``{train,test}/{NORMAL,PNEUMONIA}/*.jpeg`` grey images (pneumonia = a bright patch)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("NORMAL", "PNEUMONIA"):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 80, (40, 40), dtype=np.uint8)
                if name == "PNEUMONIA":
                    pixels[10:30, 22:36] += 150
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpeg")
    return root


@pytest.mark.parametrize("recipe", CXR)
def test_cxr_recipe_smoke(recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOMAINCLIP_CACHE", str(tmp_path / "features"))
    data = write_pneumonia_folders(tmp_path / "cxr")
    overrides = [f"output_dir={tmp_path / 'runs'}", f"data.train.path={data}", f"eval.0.data.path={data}", *COMMON]
    cfg = config_lib.load(RunConfig, RECIPES / f"{recipe}.yaml", overrides)
    assert cfg.data.train.class_names == {"NORMAL": "clear healthy lungs", "PNEUMONIA": "pneumonia"}
    if recipe != "cxr_pneumonia_linear_probe":
        assert cfg.data.augment["name"] == "cxr"
    result = train(cfg)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())[0]
    assert metrics["dataset"] == "chest_xray_pneumonia_test" and metrics["metrics"]["n_samples"] == 8
    assert 0.0 <= metrics["metrics"]["acc1"] <= 1.0
    assert (result.run_dir / "model" / "trainable.safetensors").is_file()


def test_ct_recipe_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("monai", reason="MONAI (extra 'medical') is not installed")
    pytest.importorskip("nibabel", reason="nibabel (extra 'medical') is not installed")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "medical_cache"))
    manifest = write_ct_set(tmp_path / "ct", depth=8)
    manifest.write_text("image,label_map,label_names,split,slices\n"
                        "ct.nii.gz,seg.nii.gz,labels.json,train,0:4\nct.nii.gz,seg.nii.gz,labels.json,test,2:5\n"
                        "ct.nii.gz,seg.nii.gz,labels.json,test,5:8\n")
    overrides = [f"output_dir={tmp_path / 'runs'}", f"data.train.path={manifest}", f"eval.0.data.path={manifest}",
                 "eval.0.data.label_key=liver", *COMMON]
    result = train(config_lib.load(RunConfig, RECIPES / "ct_organs_lora.yaml", overrides))
    metrics = json.loads((result.run_dir / "metrics.json").read_text())[0]["metrics"]
    assert metrics["n_samples"] == 6  # slices 2..7: liver in 2, 3; absent in 4..7
    assert 0.0 <= metrics["acc1"] <= 1.0
    # pseudo-volumes = the two test blocks: 2..4 (liver) and 5..7 (none), scored by their max slice
    assert metrics["n_pseudo_volumes"] == 2 and metrics["pseudo_volume_aggregate"] == "max"
    assert [sum(row) for row in metrics["pseudo_volume_confusion_matrix"]] == [1, 1]
    assert 0.0 <= metrics["pseudo_volume_auroc"] <= 1.0

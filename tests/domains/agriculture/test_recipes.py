"""Every recipes/agriculture/<method>.yaml trains a few steps on CPU (tiny open_clip, fake PlantVillage)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from domainclip.core import config as config_lib
from domainclip.core.run_config import RunConfig
from domainclip.core.train import train

from .make_fake_data import APPLE, write_plantvillage

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "agriculture"
METHODS = ["full", "lit", "lora", "coop", "cocoop", "maple", "projector", "linear_probe", "tip_adapter"]


def test_every_method_has_a_recipe() -> None:
    stems = {p.stem for p in RECIPES.glob("*.yaml")}
    # recipes of the later methods (distill, fare) are loaded and checked by test_shipped_recipes.py
    assert stems == set(METHODS) | {"distill", "fare"}


@pytest.mark.parametrize("method", METHODS)
def test_recipe_smoke(method: str, tmp_path: Path) -> None:
    data = write_plantvillage(tmp_path / "pv", per_class=2, size=32)
    overrides = [f"output_dir={tmp_path / 'runs'}", "model={kind: open_clip, name: domainclip-tiny-vit}",
                 f"data.train.path={data}", "data.batch_size=4", "data.num_workers=0", "train.max_steps=2",
                 "train.precision='no'", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
                 "train.warmup_steps=0", f"eval.0.data.path={data}", "eval.0.batch_size=8"]
    if method == "maple":
        overrides.append("method.depth=2")  # the tiny model has 2 blocks per tower
    cfg = config_lib.load(RunConfig, RECIPES / f"{method}.yaml", overrides)
    assert cfg.model.kind == "open_clip" and cfg.method.name == ("full" if method == "lit" else method)
    assert cfg.data.train.format == "plantvillage"
    result = train(cfg)
    metrics = {entry["dataset"]: entry for entry in json.loads((result.run_dir / "metrics.json").read_text())}
    test = metrics["plantvillage_apple_test"]["metrics"]
    assert test["n_samples"] == 2 * len(APPLE) and 0.0 <= test["acc1"] <= 1.0
    assert (result.run_dir / "model" / "trainable.safetensors").is_file()
    saved = (result.run_dir / "config.yaml").read_text()
    assert "field_photo" in saved or method in ("projector", "linear_probe", "tip_adapter")

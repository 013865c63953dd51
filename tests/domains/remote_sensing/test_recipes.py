"""Every recipes/remote_sensing/<method>.yaml trains a few steps on CPU (tiny open_clip, fake RSICD)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from domainclip.core import config as config_lib
from domainclip.core.run_config import RunConfig
from domainclip.core.train import train

from .make_fake_data import SCENES, write_karpathy_set

RECIPES = Path(__file__).resolve().parents[3] / "recipes" / "remote_sensing"
METHODS = ["full", "lit", "lora", "coop", "cocoop", "maple", "projector", "linear_probe", "tip_adapter"]


def test_every_method_has_a_recipe() -> None:
    # multispectral_*.yaml read GeoTIFFs (smoke-tested in test_multispectral_training.py)
    stems = {p.stem for p in RECIPES.glob("*.yaml") if not p.stem.startswith("multispectral_")}
    assert stems == set(METHODS) | {"filip"}  # filip.yaml (a loss over LoRA): checked by test_shipped_recipes.py


def smoke_overrides(data: Path, out: Path, batch_size: int = 4) -> list[str]:
    """Replace the compact base by the tiny open_clip model and RSICD by the fake set."""
    return [f"output_dir={out}", "model={kind: open_clip, name: domainclip-tiny-vit}",
            f"data.train.path={data}", f"data.batch_size={batch_size}", "data.num_workers=0",
            "train.max_steps=2", "train.precision='no'", "train.progress=false", "train.tensorboard=false",
            "train.log_every=1", "train.warmup_steps=0",
            f"eval.0.data.path={data}", f"eval.1.data.path={data}", "eval.0.batch_size=8", "eval.1.batch_size=8"]


@pytest.mark.parametrize("method", METHODS)
def test_recipe_smoke(method: str, tmp_path: Path) -> None:
    data = write_karpathy_set(tmp_path / "rsicd", per_class=3, numeric=2, size=32)
    overrides = smoke_overrides(data, tmp_path / "runs")
    if method == "maple":
        overrides.append("method.depth=2")  # the tiny model has 2 blocks per tower
    cfg = config_lib.load(RunConfig, RECIPES / f"{method}.yaml", overrides)
    assert cfg.model.kind == "open_clip" and cfg.method.name == ("full" if method == "lit" else method)
    result = train(cfg)
    metrics = {entry["dataset"]: entry for entry in json.loads((result.run_dir / "metrics.json").read_text())}
    retrieval = metrics["rsicd_test_retrieval"]["metrics"]
    assert {"image_retrieval_recall@1", "text_retrieval_recall@1"} <= set(retrieval), retrieval
    scenes = metrics["rsicd_test_scenes"]["metrics"]
    assert 0.0 <= scenes["acc1"] <= 1.0
    assert (result.run_dir / "model" / "trainable.safetensors").is_file()
    # the zero-shot evaluation saw only the labelled test images: numeric names were left out
    assert scenes["n_samples"] == 3 * len(SCENES) and scenes["n_skipped_records"] == 2

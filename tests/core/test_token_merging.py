"""Token merging (ToMe, PiToMe) in the image towers of every backbone family."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.config import ConfigError
from domainclip.core.features import FeatureCache
from domainclip.core.run_config import RunConfig
from domainclip.core.token_merging import (TokenMergingConfig, apply_token_merging, merging_of, pitome_matching,
                                           prefix_tokens, remove_token_merging, tome_matching, token_merging)
from domainclip.core.train.evaluation import run_eval_tasks
from domainclip.core.zeroshot import ZeroShotClassifier

from ..tiny_models import dual_config, save_tiny_hf

REPO = Path(__file__).resolve().parents[2]
APPLE = REPO / "recipes" / "sample_data" / "plantvillage_apple"


def build(family: str, tmp_path: Path) -> nn.Module:
    torch.manual_seed(0)
    if family == "open_clip":
        cfg = ModelConfig(kind="open_clip", name="domainclip-tiny-vit")
    elif family == "timm":
        cfg = dual_config()
    else:
        folder = str(save_tiny_hf(tmp_path / family, family, patch_size=8))
        cfg = ModelConfig(kind="siglip2" if family == "siglip2" else "hf", name=folder)
    return create_backbone(cfg).eval()


FAMILIES = ["open_clip", "clip", "siglip", "siglip2", "timm"]
PROTECTED = {"open_clip": 1, "clip": 1, "siglip": 0, "siglip2": 0, "timm": 1}  # SigLIP (2) has no class token


def test_r_zero_is_exactly_the_unmerged_model(tmp_path: Path) -> None:
    model = build("open_clip", tmp_path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model.encode_image(images)
        apply_token_merging(model, TokenMergingConfig(algorithm="pitome", r=0))
        assert merging_of(model) is None and "forward" not in vars(model.model.visual.transformer.resblocks[0])
        assert torch.allclose(model.encode_image(images), reference, atol=1e-5)  # as with schedule [0, 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_merging_forward_without_merges_reproduces_the_block(family: str, tmp_path: Path) -> None:
    """The re-implemented attention + MLP of each family equals the library's own block."""
    model = build(family, tmp_path)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        reference = model.encode_image(images)
        apply_token_merging(model, TokenMergingConfig(r=1), schedule=[0, 0])
        assert torch.allclose(model.encode_image(images), reference, atol=1e-5)
        assert prefix_tokens(model) == PROTECTED[family]


@pytest.mark.parametrize("algorithm", ["tome", "pitome"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_per_block_as_computed(family: str, algorithm: str, tmp_path: Path) -> None:
    model = build(family, tmp_path)
    apply_token_merging(model, TokenMergingConfig(algorithm=algorithm, r=3))
    with torch.no_grad():
        features = model.encode_image(torch.rand(2, 3, 32, 32))
    tokens = 16 + PROTECTED[family]  # 32x32 pixels in 8x8 patches, plus the class token
    assert merging_of(model).tokens == [tokens, tokens - 3, tokens - 6]
    assert features.shape == (2, model.embed_dim) and torch.isfinite(features).all()
    remove_token_merging(model)
    assert all("_token_merging" not in vars(module) for module in model.modules())


def test_schedule_caps_r_and_flop_ratio_picks_the_smallest_r(tmp_path: Path) -> None:
    model = build("open_clip", tmp_path)
    apply_token_merging(model, TokenMergingConfig(r=7))
    state = merging_of(model)
    assert state.constant(7, 17) == [7, 4]  # 16 mergeable tokens: 7 merge; then 9 mergeable: at most 9 // 2
    apply_token_merging(model, TokenMergingConfig(flop_ratio=0.7))
    state = merging_of(model)
    schedule = state.plan(17, 64)
    full = state.flops([0, 0], 17, 64)
    r = schedule[0]
    assert state.flops(schedule, 17, 64) <= 0.7 * full < state.flops(state.constant(r - 1, 17), 17, 64)
    apply_token_merging(model, TokenMergingConfig(flop_ratio=0.05))
    with pytest.raises(ValueError, match=r"flop_ratio 0.05 is out of reach for 17 tokens: the most merging \(r=8\)"):
        model.encode_image(torch.rand(1, 3, 32, 32))
    images = torch.rand(2, 3, 32, 32)
    remove_token_merging(model)
    with torch.no_grad():
        reference = model.encode_image(images)
        apply_token_merging(model, TokenMergingConfig(flop_ratio=1.0))  # all the FLOPs allowed: nothing merged
        assert merging_of(model).plan(17, 64) == [0, 0]
        assert torch.allclose(model.encode_image(images), reference, atol=1e-5)  # as with schedule [0, 0]


@pytest.mark.parametrize("matching", ["tome", "pitome"])
def test_merging_keeps_the_size_weighted_sum_and_the_token_count(matching: str) -> None:
    torch.manual_seed(0)
    x, metric, size = torch.randn(2, 11, 5), torch.randn(2, 11, 4), torch.randint(1, 4, (2, 11, 1)).float()
    merge = tome_matching(metric, 4) if matching == "tome" else pitome_matching(metric, 4, margin=0.5)
    merged_size = merge(size)
    merged = merge(x * size) / merged_size
    assert merged.shape == (2, 7, 5)
    assert torch.allclose(merged_size.sum(1), size.sum(1))
    assert torch.allclose((merged * merged_size).sum(1), (x * size).sum(1), atol=1e-5)


def test_the_class_token_is_never_merged(tmp_path: Path) -> None:
    model = build("open_clip", tmp_path)
    apply_token_merging(model, TokenMergingConfig(r=8))
    state = merging_of(model)
    state.begin(17, 64)
    x = torch.randn(2, 17, 64)
    metric = x.clone()
    metric[:, 0] = metric[:, 1]  # the class token looks exactly like a patch: still kept
    out = state.merge(0, x, metric)
    assert out.shape == (2, 9, 64) and torch.equal(out[:, 0], x[:, 0]) and (state.size[:, 0] == 1).all()


def test_deepcopy_carries_its_own_merging(tmp_path: Path) -> None:
    model = apply_token_merging(build("open_clip", tmp_path), TokenMergingConfig(r=2))
    twin = copy.deepcopy(model)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(twin.encode_image(images), model.encode_image(images))
    assert merging_of(twin) is not merging_of(model) and merging_of(twin).tokens == [17, 15, 13]


def test_unknown_block_types_and_bad_settings_fail_clearly(tmp_path: Path) -> None:
    model = build("open_clip", tmp_path)
    model.model.visual.transformer.resblocks[0] = nn.Identity()
    with pytest.raises(ValueError, match=r"block model.visual.transformer.resblocks.0 is a torch.nn.modules.linear."
                                         r"Identity, which has no registered merging forward"):
        apply_token_merging(model, TokenMergingConfig(r=2))
    with pytest.raises(ValueError, match=r"'tomee' is not one of \['tome', 'pitome'\]; did you mean 'tome'"):
        TokenMergingConfig(algorithm="tomee")
    with pytest.raises(ValueError, match=r"set r \(4\) or flop_ratio \(0.5\), not both"):
        TokenMergingConfig(r=4, flop_ratio=0.5)
    with pytest.raises(ConfigError, match=r"token_merging.train: true needs r > 0"):
        config_lib.from_dict(RunConfig, {"token_merging": {"train": True}})
    assert TokenMergingConfig.parse("pitome:flops=0.6") == TokenMergingConfig(algorithm="pitome", flop_ratio=0.6)
    with pytest.raises(ValueError, match=r"expected ALGORITHM:R or ALGORITHM:flops=RATIO"):
        TokenMergingConfig.parse("tome")


def test_feature_cache_keys_the_merge_setting(tmp_path: Path) -> None:
    model = build("open_clip", tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    plain = cache.space_key(model, "image")
    with token_merging(model, TokenMergingConfig(r=2)):
        tome2 = cache.space_key(model, "image")
        assert cache.space_key(model, "text") == cache.space_key(build("open_clip", tmp_path), "text")
    with token_merging(model, TokenMergingConfig(algorithm="pitome", r=2)):
        pitome2 = cache.space_key(model, "image")
    assert len({plain, tome2, pitome2}) == 3
    assert cache.space_key(model, "image") == plain  # the context restored the unmerged model


def test_evaluation_and_the_zero_shot_api_merge(colour_squares: Path, tmp_path: Path) -> None:
    data = {"format": "csv", "path": str(colour_squares), "label_key": "label", "caption_separator": "|"}
    cfg = config_lib.from_dict(RunConfig, {"model": {"kind": "open_clip", "name": "domainclip-tiny-vit"},
                                           "token_merging": {"algorithm": "tome", "r": 2},
                                           "eval": [{"name": "squares", "data": data, "templates": ["a {} square"]}]})
    model = build("open_clip", tmp_path)
    (record,) = run_eval_tasks(cfg, model)
    assert record["token_merging"] == {"algorithm": "tome", "r": 2, "flop_ratio": 0.0, "protected": 1}
    assert merging_of(model) is None  # evaluation restored the model
    classifier = ZeroShotClassifier(model, token_merging="tome:2", device="cpu")
    images = [str(p) for p in sorted((colour_squares.parent / "img").glob("*.jpg"))[:4]]
    merged = classifier.predict_proba(images, ["red", "green", "blue"])
    assert merging_of(model).tokens == [17, 15, 13]
    assert classifier.info()["token_merging"]["r"] == 2
    plain = ZeroShotClassifier(model, token_merging="tome:0", device="cpu").predict_proba(images, ["red", "green", "blue"])
    assert merging_of(model) is None and not torch.equal(merged, plain)


def test_maple_refuses_merging_before_training_and_cocoop_merges(colour_squares: Path, tmp_path: Path) -> None:
    """MaPLe appends prompt tokens to the image sequence: merging is refused at the start of the
    run (not after training, at its evaluation). CoCoOp's image tower is the plain one."""
    from domainclip.core.train import load_trained, train

    from ..conftest import tiny_recipe

    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=1)
    recipe.update(method={"name": "maple", "n_ctx": 2, "depth": 2}, token_merging={"r": 2})
    with pytest.raises(ValueError, match=r"token merging is not supported by method 'maple': the image tower carries "
                                         r"learned vision prompts \(MaPLe\)"):
        train(config_lib.from_dict(RunConfig, recipe))
    assert not (tmp_path / "runs" / "tiny" / "checkpoints").exists()
    recipe.update(method={"name": "cocoop", "n_ctx": 2}, name="cocoop")
    model, _, _ = load_trained(train(config_lib.from_dict(RunConfig, recipe)).run_dir)
    apply_token_merging(model, TokenMergingConfig(r=2))
    with torch.no_grad():
        model.encode_image(torch.rand(2, 3, 32, 32))
    assert merging_of(model).tokens == [17, 15, 13]


def test_onnx_export_with_a_fixed_merge_schedule(tmp_path: Path, colour_squares: Path) -> None:
    pytest.importorskip("onnxruntime")
    from domainclip.core.zeroshot import OnnxZeroShotClassifier, export_onnx

    classifier = ZeroShotClassifier(build("open_clip", tmp_path), token_merging="pitome:3", device="cpu")
    labels = ["red", "green", "blue"]
    path = export_onnx(classifier, labels, tmp_path / "merged.onnx")
    onnx_classifier = OnnxZeroShotClassifier(path)
    assert onnx_classifier.metadata["token_merging"]["schedule"] == [3, 3]
    images = [str(p) for p in sorted((colour_squares.parent / "img").glob("*.jpg"))[:3]]
    assert torch.allclose(onnx_classifier.predict_proba(images), classifier.predict_proba(images, labels), atol=1e-4)
    assert merging_of(classifier.model).fixed is None  # the export froze the schedule only while exporting


@pytest.mark.parametrize("algorithm", ["tome", "pitome"])
def test_merged_features_stay_close_on_real_leaves_with_the_compact_base(algorithm: str) -> None:
    images = sorted((APPLE / "images").rglob("*.jpg"))[:8]
    if not images:
        pytest.skip(f"no bundled sample images under {APPLE}")
    classifier = ZeroShotClassifier.from_pretrained("compact_base", device="cpu")
    reference = classifier.encode_images([str(p) for p in images])
    apply_token_merging(classifier.model, TokenMergingConfig(algorithm=algorithm, r=4))
    merged = classifier.encode_images([str(p) for p in images])
    tokens = merging_of(classifier.model).tokens
    assert tokens[0] - tokens[-1] == 4 * (len(tokens) - 1)
    assert (merged * reference).sum(-1).min() > 0.97


@pytest.mark.parametrize("family", ["open_clip", "clip"])
def test_merged_features_stay_close_on_real_leaves_with_tiny_towers(family: str, tmp_path: Path) -> None:
    images = sorted((APPLE / "images").rglob("*.jpg"))[:6]
    if not images:
        pytest.skip(f"no bundled sample images under {APPLE}")
    classifier = ZeroShotClassifier(build(family, tmp_path), device="cpu")
    reference = classifier.encode_images([str(p) for p in images])
    apply_token_merging(classifier.model, TokenMergingConfig(r=1))
    merged = classifier.encode_images([str(p) for p in images])
    assert (merged * reference).sum(-1).min() > 0.99

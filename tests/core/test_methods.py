"""Full fine-tuning and locked towers: exactly the right parameters train, decay groups, lr decay."""
from __future__ import annotations

import pytest
import torch

from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.methods import build_method
from domainclip.core.methods.full import FullConfig

from ..tiny_models import tiny_open_clip


def tiny():
    return tiny_open_clip()


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_full_trains_everything() -> None:
    model = build_method(FullConfig()).apply(tiny())
    assert trainable(model) == {n for n, _ in model.named_parameters()}


def test_locked_image_tower_with_last_block_unlocked() -> None:
    model = tiny()
    method = build_method(FullConfig(lock_image=True, unlocked_image_blocks=1))
    method.apply(model)
    groups = model.tower_parameter_groups("image")
    expected_image = set(groups[-1]) | set(groups[-2])  # head + last block
    assert trainable(model) & set(model.tower_parameter_names("image")) == expected_image
    assert set(model.tower_parameter_names("text")) <= trainable(model)
    assert "model.visual.conv1.weight" not in trainable(model)
    assert "model.visual.transformer.resblocks.1.attn.in_proj_weight" in trainable(model)
    assert "model.visual.transformer.resblocks.0.attn.in_proj_weight" not in trainable(model)
    state = method.trainable_state(model)
    assert set(state) == trainable(model)


def test_lit_locks_the_whole_tower_and_optionally_the_temperature() -> None:
    model = tiny()
    build_method(FullConfig(lock_image=True, train_logit_scale=False)).apply(model)
    assert trainable(model) == set(model.tower_parameter_names("text"))


def test_too_many_unlocked_blocks_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"method.unlocked_text_blocks=5 but the text tower has 2 blocks"):
        build_method(FullConfig(lock_text=True, unlocked_text_blocks=5)).apply(tiny())
    with pytest.raises(ValueError, match=r"method.unlocked_image_blocks=1 unlocks blocks of a locked tower: set "
                                         r"method.lock_image: true"):
        FullConfig(unlocked_image_blocks=1)


def test_no_weight_decay_on_norms_biases_and_logit_scale() -> None:
    model = tiny()
    method = build_method(FullConfig())
    method.apply(model)
    groups = method.param_groups(model, lr=1.0, weight_decay=0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.2 for p in g["params"]}
    assert "model.logit_scale" in no_decay and "model.ln_final.weight" in no_decay
    assert "model.visual.transformer.resblocks.0.attn.in_proj_bias" in no_decay
    assert "model.visual.transformer.resblocks.0.attn.in_proj_weight" in decay
    assert "model.text_projection" in decay
    assert not decay & no_decay and len(decay | no_decay) == len(names)


def test_layer_wise_lr_decay() -> None:
    model = tiny()
    method = build_method(FullConfig(layer_decay=0.5))
    method.apply(model)
    groups = method.param_groups(model, lr=1.0, weight_decay=0.0)
    lr_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            lr_of[names[id(p)]] = group["lr"]
    # 4 groups per tower: embedding 0.125, block0 0.25, block1 0.5, head 1.0
    assert lr_of["model.visual.conv1.weight"] == pytest.approx(0.125)
    assert lr_of["model.visual.transformer.resblocks.0.mlp.c_fc.weight"] == pytest.approx(0.25)
    assert lr_of["model.transformer.resblocks.1.mlp.c_fc.weight"] == pytest.approx(0.5)
    assert lr_of["model.visual.proj"] == pytest.approx(1.0)
    assert lr_of["model.logit_scale"] == pytest.approx(1.0)


def test_unknown_method_fails_loudly() -> None:
    from domainclip.core.methods.base import MethodConfig

    cfg = MethodConfig(name="loar")
    with pytest.raises(ValueError, match=r"method.name 'loar' is not a method"):
        build_method(cfg)


def test_load_trainable_state_checks_names_and_shapes() -> None:
    model = tiny()
    method = build_method(FullConfig())
    method.apply(model)
    with pytest.raises(KeyError, match="not parameters of this model"):
        method.load_trainable_state(model, {"nope": torch.zeros(1)}, source="x.safetensors")
    with pytest.raises(ValueError, match=r"model.logit_scale has shape \(2,\), model expects \(\)"):
        method.load_trainable_state(model, {"model.logit_scale": torch.zeros(2)}, source="x.safetensors")

"""train.bf16_weights: bf16 matrices stepped through fp32 masters compute what bf16 autocast computes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.config import ConfigError
from domainclip.core.run_config import RunConfig
from domainclip.core.train import train
from domainclip.core.train.master_weights import MasterWeights, bf16_matrices

from ..conftest import tiny_recipe


def run(recipe: dict, *overrides: str):
    return train(config_lib.load(RunConfig, None, overrides, base=recipe))


def trained(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "trainable.safetensors"))


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines]


def test_the_matrices_are_held_in_bf16_and_the_rest_stays_fp32() -> None:
    model = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit"))
    names = {name for name, _ in bf16_matrices(model)}
    assert {"model.visual.conv1.weight", "model.visual.proj", "model.text_projection",
            "model.transformer.resblocks.0.attn.in_proj_weight", "model.transformer.resblocks.0.attn.out_proj.weight",
            "model.visual.transformer.resblocks.0.mlp.c_fc.weight"} <= names
    kept = {"model.token_embedding.weight", "model.positional_embedding", "model.visual.class_embedding",
            "model.ln_final.weight", "model.logit_scale", "model.transformer.resblocks.0.attn.in_proj_bias"}
    assert not names & kept
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    masters = MasterWeights(model)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.bfloat16 if name in names else torch.float32), name
    groups = masters.param_groups([{"params": list(model.parameters()), "lr": 1.0}])
    assert all(p.dtype == torch.float32 for p in groups[0]["params"])
    with masters.full_precision():
        assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert model.model.visual.conv1.weight.dtype == torch.bfloat16
    masters.release()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("variant", ["clip", "custom_text", "untrimmed"])
def test_every_open_clip_text_path_keeps_autocasts_fp32_stream(variant: str, tmp_path: Path) -> None:
    """open_clip picks its text stream's dtype from a block's weight; bf16 weights must not make it bf16
    (CustomTextCLIP towers, and CLIP's own encode_text when the kit cannot trim the padding)."""
    import copy
    import open_clip

    name = "domainclip-tiny-vit"
    if variant == "custom_text":
        config = json.loads((Path(__file__).parents[2] / "core/backbones/model_configs" / f"{name}.json").read_text())
        name = "domainclip-tiny-vit-custom-text-test"
        (tmp_path / f"{name}.json").write_text(json.dumps({**config, "custom_text": True}))
        open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    reference = create_backbone(ModelConfig(kind="open_clip", name=name)).eval()
    assert (type(reference.model).__name__ == "CustomTextCLIP") == (variant == "custom_text")
    if variant == "untrimmed":
        reference.model.attn_mask = None  # no causal mask: trimming is not exact, encode_text itself runs
    ours = copy.deepcopy(reference)
    masters = MasterWeights(ours)
    tokens = reference.tokenize(["a red square", "a small blue square on a white ground"])
    images = torch.randn(2, 3, 32, 32)
    # with gradients, as in training (without them, nn.MultiheadAttention's fused inference path runs
    # the fp32 reference in fp32 where autocast would not; evaluation uses the fp32 masters anyway)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours.encode_text(tokens, normalize=False), reference.encode_text(tokens, normalize=False))
        assert torch.equal(ours.encode_image(images, normalize=False), reference.encode_image(images, normalize=False))
    masters.release()
    assert all("get_cast_dtype" not in module.__dict__ for module in ours.modules())
    MasterWeights(ours)
    assert {module.get_cast_dtype() for module in copy.deepcopy(ours).modules()  # a copy keeps the pin
            if "get_cast_dtype" in module.__dict__} == {torch.float32}


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "full", "lock_text": True},
                                    {"name": "lora", "rank": 4, "alpha": 8}, {"name": "coop", "n_ctx": 2},
                                    {"name": "maple", "n_ctx": 2, "depth": 2}, {"name": "fare", "steps": 1}],
                         ids=["full", "locked_text_cached", "lora", "coop", "maple", "fare"])
def test_bf16_weights_train_as_bf16_autocast_does(method: dict, colour_squares: Path, tmp_path: Path) -> None:
    """Same batches, same seeds: the bf16 copy of a matrix is what autocast casts it to, and its
    gradient is what autocast's cast returns, so losses and trained weights are bit-identical."""
    runs = {}
    for name, bf16_weights in (("autocast", False), ("bf16_weights", True)):
        recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=6, precision="bf16",
                             bf16_weights=bf16_weights)
        recipe.update(name=name, method=method)
        runs[name] = run(recipe).run_dir
    reference, ours = trained(runs["autocast"]), trained(runs["bf16_weights"])
    assert reference.keys() == ours.keys()
    assert all(t.dtype == torch.float32 for t in ours.values())  # the fp32 masters are what is saved
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key
    assert losses(runs["bf16_weights"]) == losses(runs["autocast"])


def test_checkpoints_hold_the_fp32_masters_and_resume_exactly(colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=6, precision="bf16", bf16_weights=True,
                         save_every=3, keep_checkpoints=5)
    straight = run({**recipe, "name": "straight"}).run_dir
    step3 = straight / "checkpoints" / "step_0000003"
    saved = load_file(str(step3 / "trainable.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    autocast = run({**recipe, "name": "autocast", "train": {**recipe["train"], "bf16_weights": False}}).run_dir
    reference = load_file(str(autocast / "checkpoints" / "step_0000003" / "trainable.safetensors"))
    assert all(torch.equal(saved[k], reference[k]) for k in reference)
    resumed = run({**recipe, "name": "resumed", "train": {**recipe["train"], "resume": str(step3)}}).run_dir
    assert all(torch.equal(a, b) for a, b in zip(trained(resumed).values(), trained(straight).values()))
    assert losses(resumed) == losses(straight)[3:]


def test_bf16_weights_need_bf16_precision() -> None:
    with pytest.raises(ConfigError, match=r"train.bf16_weights: true needs train.precision: bf16 or auto \(got 'no'\)"):
        config_lib.from_dict(RunConfig, {"train": {"precision": "no", "bf16_weights": True}})

"""Robustness: PGD in pixel space, corruptions, the ``robustness`` eval task, FARE and TeCoA."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.backbones.base import PreprocessConfig
from domainclip.core.config import ConfigError
from domainclip.core.data import load_records
from domainclip.core.export import export_run
from domainclip.core.eval import build_zeroshot_classifier, encode_texts, captions_from_records, evaluate_retrieval, evaluate_zeroshot
from domainclip.core.methods import TaskInfo, build_method
from domainclip.core.robustness.evaluate import caption_loss
from domainclip.core.robustness import (CORRUPTIONS, PixelSpace, RobustnessConfig, corrupt, corruption_set, pgd_linf,
                                        robust_retrieval, robust_zeroshot)
from domainclip.core.run_config import EvalTaskConfig, RunConfig
from domainclip.core.train import train
from domainclip.core.train.evaluation import eval_loader

from ..conftest import tiny_recipe


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit")).eval()


def task_of(manifest: Path, **robustness: object) -> EvalTaskConfig:
    data = {"format": "csv", "path": str(manifest), "label_key": "label", "caption_separator": "|"}
    return config_lib.from_dict(EvalTaskConfig, {"name": "squares", "task": "robustness", "data": data,
                                                 "templates": ["a {} square"], "batch_size": 10,
                                                 "robustness": robustness})


def clean_batch(model: torch.nn.Module, manifest: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels in [0, 1], labels and the zero-shot head of the first 12 colour squares."""
    task = task_of(manifest)
    records, loader = eval_loader(task, model, num_workers=0)
    batch = next(iter(loader))
    head = build_zeroshot_classifier(model, records.class_names, ["a {} square"])
    return PixelSpace(model.preprocess).to_pixels(batch["images"]), batch["labels"], head


def ce_loss(model: torch.nn.Module, head: torch.Tensor, labels: torch.Tensor):
    space = PixelSpace(model.preprocess)
    return lambda p: F.cross_entropy(100 * model.encode_image(space.normalise(p)) @ head, labels, reduction="none")


# --- pixel space and the attack ---------------------------------------------------------------
def test_pixel_space_undoes_the_normalisation_and_refuses_readers() -> None:
    space = PixelSpace(PreprocessConfig(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)))
    pixels = torch.rand(2, 3, 8, 8)
    assert torch.allclose(space.to_pixels(space.normalise(pixels)), pixels, atol=1e-6)
    assert torch.allclose(space.normalise(pixels)[:, 1], (pixels[:, 1] - 0.4) / 0.25)
    with pytest.raises(ValueError, match=r"preprocess.reader \{'name': 'geotiff'\}.*no \[0, 1\] pixel range"):
        PixelSpace(PreprocessConfig(mean=(0.0,) * 4, std=(1.0,) * 4, reader={"name": "geotiff"}))


def test_eps_zero_returns_the_clean_pixels(colour_squares: Path) -> None:
    model = tiny_model()
    pixels, labels, head = clean_batch(model, colour_squares)
    adversarial = pgd_linf(ce_loss(model, head, labels), pixels, 0.0, steps=5, step_size=1 / 255)
    assert torch.equal(adversarial, pixels)


def test_attack_raises_the_loss_and_stays_in_the_ball_and_the_pixel_range(colour_squares: Path) -> None:
    model = tiny_model()
    pixels, labels, head = clean_batch(model, colour_squares)
    loss = ce_loss(model, head, labels)
    eps = 4 / 255
    adversarial = pgd_linf(loss, pixels, eps, steps=5, step_size=1 / 255,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean_loss, adversarial_loss = loss(pixels), loss(adversarial)
    assert (adversarial_loss > clean_loss).all(), (clean_loss, adversarial_loss)
    assert (adversarial - pixels).abs().max() <= eps + 1e-6
    assert (adversarial - pixels).abs().max() > eps / 2  # it moved
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    assert all(p.grad is None for p in model.parameters())  # gradients only reached the pixels


def test_attack_is_deterministic_with_a_seed(colour_squares: Path) -> None:
    model = tiny_model()
    pixels, labels, head = clean_batch(model, colour_squares)
    loss = ce_loss(model, head, labels)
    run = lambda seed: pgd_linf(loss, pixels, 2 / 255, 2, 0.5 / 255, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


# --- corruptions -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruptions_keep_shape_and_range_and_are_seeded(name: str) -> None:
    pixels = torch.rand(2, 3, 32, 32)
    first = corrupt(name, pixels, 3, torch.Generator().manual_seed(0))
    again = corrupt(name, pixels, 3, torch.Generator().manual_seed(0))
    assert first.shape == pixels.shape and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first, pixels)


def test_corruption_sets_per_domain() -> None:
    assert "hflip" in corruption_set("default")
    chest = corruption_set("chest_xray")  # registered by the medical domain, loaded on demand
    assert "hflip" not in chest and {"gaussian_noise", "gaussian_blur", "jpeg"} <= set(chest)
    assert corruption_set("") == ()
    with pytest.raises(ValueError, match=r"'chest_xrays' is not a registered corruption set; did you mean 'chest_xray'"):
        corruption_set("chest_xrays")


def test_robustness_config_errors(colour_squares: Path) -> None:
    with pytest.raises(ConfigError, match=r"robustness.target must be one of \('zeroshot', 'retrieval'\), got 'detection'"):
        task_of(colour_squares, target="detection")
    with pytest.raises(ConfigError, match=r"a robustness section needs task 'robustness', got 'zeroshot'"):
        config_lib.from_dict(EvalTaskConfig, {"task": "zeroshot", "robustness": {"eps": [8]}})
    with pytest.raises(ConfigError, match=r"robustness.eps values must be >= 0"):
        task_of(colour_squares, eps=[-1])


# --- the eval task -----------------------------------------------------------------------------
def test_robust_zeroshot_reports_clean_and_robust_side_by_side(colour_squares: Path) -> None:
    model = tiny_model()
    task = task_of(colour_squares, eps=[0, 1, 4], steps=3, corruptions="default")
    records, loader = eval_loader(task, model, num_workers=0)
    metrics = robust_zeroshot(model, loader, records.class_names, task.templates, task.robustness)
    reference = evaluate_zeroshot(model, loader, records.class_names, task.templates)
    assert metrics["acc1_clean"] == pytest.approx(reference["acc1"])
    assert metrics["acc1_pgd_eps0"] == metrics["acc1_clean"]
    assert metrics["acc1_pgd_eps4"] <= metrics["acc1_pgd_eps1"] <= metrics["acc1_clean"]
    assert {f"acc1_{name}" for name in corruption_set("default")} <= set(metrics)
    assert metrics["n_images"] == 24 and metrics["pgd_step_size_255"]["pgd_eps4"] == pytest.approx(2.5 * 4 / 3)
    again = robust_zeroshot(model, loader, records.class_names, task.templates, task.robustness)
    assert again == metrics  # seeded


def test_robust_retrieval_matches_clean_retrieval(colour_squares: Path) -> None:
    model = tiny_model()
    task = task_of(colour_squares, target="retrieval", eps=[0, 4], steps=3, corruptions="")
    records, loader = eval_loader(task, model, num_workers=0)
    captions, text_to_image = captions_from_records(records.records)
    metrics = robust_retrieval(model, loader, captions, text_to_image, task.robustness)
    reference = evaluate_retrieval(model, loader, captions, text_to_image)
    for k in (1, 5, 10):
        assert metrics[f"text_retrieval_recall@{k}_clean"] == pytest.approx(reference[f"text_retrieval_recall@{k}"])
        assert metrics[f"text_retrieval_recall@{k}_pgd_eps0"] == metrics[f"text_retrieval_recall@{k}_clean"]
    assert metrics["text_retrieval_recall@10_pgd_eps4"] <= metrics["text_retrieval_recall@10_clean"]


def test_retrieval_attack_lowers_the_own_captions_probability(colour_squares: Path) -> None:
    model = tiny_model()
    pixels, _, _ = clean_batch(model, colour_squares)
    text = encode_texts(model, ["a red square", "a green square", "a blue square", "a square"])
    own = torch.zeros(pixels.shape[0], 4, dtype=torch.bool)
    own[:, 0] = True
    own[0] = False  # an image without captions: loss 0, never attacked
    space = PixelSpace(model.preprocess)
    loss = lambda p: caption_loss(model.encode_image(space.normalise(p)), text, own)  # noqa: E731
    adversarial = pgd_linf(loss, pixels, 4 / 255, 5, 1 / 255, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = loss(pixels), loss(adversarial)
    assert before[0] == 0 and after[0] == 0
    assert (after[1:] > before[1:]).all()


# --- FARE and TeCoA through the one training loop -----------------------------------------------
def adversarial_recipe(manifest: Path, out: Path, method: dict, name: str) -> dict:
    recipe = tiny_recipe(manifest, out, max_steps=6, save_every=3, keep_checkpoints=3, lr=5e-3)
    recipe["name"] = name
    recipe["method"] = method
    data = {"format": "csv", "path": str(manifest), "label_key": "label", "caption_separator": "|"}
    recipe["data"]["train"]["templates"] = ["a {} square"]
    recipe["eval"] = [{"name": "squares_robust", "task": "robustness", "data": data, "templates": ["a {} square"],
                       "robustness": {"eps": [1], "steps": 2, "corruptions": "no_flip"}}]
    return recipe


def run(recipe: dict) -> Path:
    return train(config_lib.load(RunConfig, None, [], base=recipe)).run_dir


def resume_from_first_checkpoint(run_dir: Path) -> None:
    """Pretend the run died after its first checkpoint: ``latest`` back to it, final model gone."""
    first = sorted(path.name for path in (run_dir / "checkpoints").glob("step_*"))[0]
    (run_dir / "checkpoints" / "latest").write_text(first)
    shutil.rmtree(run_dir / "model")
    (run_dir / "train_summary.json").unlink()  # as a run killed after that checkpoint leaves it


@pytest.mark.parametrize("method", [
    {"name": "fare", "eps": 4, "steps": 2, "tower_method": {"name": "lora", "towers": ["image"], "rank": 4}},
    {"name": "tecoa", "eps": 4, "steps": 2, "tower_method": {"name": "full", "lock_text": True, "train_logit_scale": False}},
])
def test_adversarial_methods_train_resume_and_evaluate(colour_squares: Path, tmp_path: Path, method: dict,
                                                      capsys: pytest.CaptureFixture) -> None:
    recipe = adversarial_recipe(colour_squares, tmp_path / "runs", method, method["name"])
    run_dir = run(recipe)
    weights = load_file(str(run_dir / "model" / "trainable.safetensors"))
    model = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit"))
    image = set(model.tower_parameter_names("image"))
    if method["tower_method"]["name"] == "lora":
        assert weights and all("lora_" in name for name in weights)
        assert all(".visual." in name for name in weights)
    else:
        assert set(weights) == image
    (record,) = json.loads((run_dir / "metrics.json").read_text())
    assert record["task"] == "zeroshot_classification_robustness"
    assert record["precision"] == "fp32"  # attacks run on the model's own (fp32) weights, whatever auto resolves to
    metrics = record["metrics"]
    assert {"acc1_clean", "acc1_pgd_eps1", "acc1_gaussian_noise", "acc1_jpeg"} <= set(metrics)
    assert "acc1_hflip" not in metrics

    resume_from_first_checkpoint(run_dir)
    capsys.readouterr()
    resumed = load_file(str(run(recipe) / "model" / "trainable.safetensors"))
    assert "resumed from step 3" in capsys.readouterr().err
    assert set(resumed) == set(weights)
    for name in weights:
        assert torch.equal(resumed[name], weights[name]), name
    # what an adversarial method trains is plain backbone weights: the family's full format takes it
    export = export_run(run_dir, "open_clip", tmp_path / "export")
    assert json.loads((export / "domainclip_export.json").read_text())["method"] == method["name"]


@pytest.mark.parametrize("family", ["hf_clip", "dual_encoder"])
def test_adversarial_methods_train_every_family(family: str, colour_squares: Path, tmp_path: Path) -> None:
    """FARE (LoRA) and TeCoA (full image tower) on the other families' towers: the image tower's
    weights move, the text tower's do not, and the robustness task scores the result."""
    from ..tiny_models import dual_config, save_tiny_hf

    if family == "hf_clip":
        model = {"kind": "hf", "name": str(save_tiny_hf(tmp_path / "hf", "clip"))}
    else:
        model = {k: v for k, v in vars(dual_config()).items() if v not in (None, "", {}, [])}
    for method in ({"name": "fare", "eps": 4, "steps": 2, "tower_method": {"name": "lora", "towers": ["image"], "rank": 4}},
                   {"name": "tecoa", "eps": 4, "steps": 2,
                    "tower_method": {"name": "full", "lock_text": True, "train_logit_scale": False}}):
        recipe = adversarial_recipe(colour_squares, tmp_path / "runs", method, f"{family}_{method['name']}")
        recipe["train"]["max_steps"] = 2
        recipe["model"] = model
        run_dir = run(recipe)
        weights = load_file(str(run_dir / "model" / "trainable.safetensors"))
        backbone = create_backbone(config_lib.from_dict(ModelConfig, model))
        image, text = set(backbone.tower_parameter_names("image")), set(backbone.tower_parameter_names("text"))
        if method["name"] == "fare":
            assert weights and all("lora_" in name for name in weights)
            assert not any(name.replace(".lora_A.default", "").replace(".lora_B.default", "") in text for name in weights)
        else:
            assert set(weights) == image and not set(weights) & text
        (record,) = json.loads((run_dir / "metrics.json").read_text())
        assert {"acc1_clean", "acc1_pgd_eps1"} <= set(record["metrics"])


def test_fare_loss_is_zero_at_the_start_without_attack(colour_squares: Path) -> None:
    cfg = config_lib.from_dict(RunConfig, {"method": {"name": "fare", "eps": 0,
                                                      "tower_method": {"name": "lora", "towers": ["image"]}}}).method
    method = build_method(cfg)
    model = method.apply(tiny_model(), TaskInfo())
    records, loader = eval_loader(task_of(colour_squares), model, num_workers=0)
    batch = next(iter(loader))
    assert method.compute_loss(model, batch, None).item() == pytest.approx(0.0, abs=1e-10)  # LoRA B starts at 0
    cfg.eps = 4.0
    assert method.compute_loss(model, batch, None).item() > 1e-6


def test_adversarial_method_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"fare trains the image tower only; set tower_method.towers: \[image\]"):
        config_lib.from_dict(RunConfig, {"method": {"name": "fare", "tower_method": {"name": "lora"}}})
    with pytest.raises(ConfigError, match=r"tecoa trains the image tower only; set tower_method.lock_text: true"):
        config_lib.from_dict(RunConfig, {"method": {"name": "tecoa", "tower_method": {"name": "full", "train_logit_scale": False}}})
    with pytest.raises(ConfigError, match=r"fare does not use the temperature; set tower_method.train_logit_scale: false"):
        config_lib.from_dict(RunConfig, {"method": {"name": "fare", "tower_method": {"name": "full", "lock_text": True}}})
    with pytest.raises(ConfigError, match=r"tower_method.name must be one of \['lora', 'full'\], got 'coop'"):
        config_lib.from_dict(RunConfig, {"method": {"name": "fare", "tower_method": {"name": "coop"}}})
    with pytest.raises(ValueError, match=r"method tecoa needs labelled training data"):
        build_method(config_lib.from_dict(RunConfig, {"method": {"name": "tecoa"}}).method).apply(tiny_model(), TaskInfo())


def test_an_images_attack_start_and_noise_do_not_depend_on_its_batch(colour_squares: Path) -> None:
    """Seeded per (seed, dataset index, condition): the same image gets the same random start and
    the same noise whether it is evaluated in one batch of 8 or in batches of 2 and 6."""
    from domainclip.core.robustness.evaluate import Conditions

    model = tiny_model()
    pixels, labels, head = clean_batch(model, colour_squares)
    pixels, labels, indices = pixels[:8], labels[:8], torch.arange(8)
    conditions = Conditions(model, RobustnessConfig(eps=[4], steps=1))  # the default set has gaussian_noise

    def loss_for(rows: slice):
        return lambda features: F.cross_entropy(100 * features @ head, labels[rows], reduction="none")

    whole = conditions.each(pixels, indices, loss_for(slice(0, 8)))
    parts = [conditions.each(pixels[rows], indices[rows], loss_for(rows)) for rows in (slice(0, 2), slice(2, 8))]
    for name in ("pgd_eps4", "gaussian_noise"):
        torch.testing.assert_close(torch.cat([part[name] for part in parts]), whole[name], atol=1e-5, rtol=1e-5)

"""WiSE-FT: exact interpolation, alpha 0/1 reproduce base/fine-tuned, the sweep picks the validation-best alpha."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.methods import build_method
from domainclip.core.methods.full import FullConfig
from domainclip.core.methods.lora import LoraConfig, merged_backbone
from domainclip.core.train import load_trained
from domainclip.core.wise_ft import interpolate, weight_space, wise_ft_sweep
from domainclip.core.run_config import RunConfig
from domainclip.core.train import train

from ..conftest import tiny_recipe

TINY = ModelConfig(kind="open_clip", name="domainclip-tiny-vit")


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return create_backbone(TINY).eval()


def features(model) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(model.tokenize(["a red square", "a blue square", "x"]))


# --- interpolation ---------------------------------------------------------------------------

def test_interpolation_is_exact() -> None:
    base = {"w": torch.tensor([0.0, 1.0, -2.0, 8.0]), "half": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
            "ids": torch.arange(3)}
    tuned = {"w": torch.tensor([4.0, 1.0, 2.0, 0.0]), "half": torch.tensor([3.0, 2.0], dtype=torch.bfloat16),
             "ids": torch.arange(3)}
    mixed = interpolate(base, tuned, 0.25)
    assert torch.equal(mixed["w"], torch.tensor([1.0, 1.0, -1.0, 6.0]))  # 0.75 * base + 0.25 * tuned
    assert mixed["half"].dtype == torch.bfloat16 and torch.equal(mixed["half"], torch.tensor([1.5, 2.0], dtype=torch.bfloat16))
    assert torch.equal(mixed["ids"], torch.arange(3))

    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 32, generator=generator)}
    tuned = {"w": torch.randn(64, 32, generator=generator)}
    for alpha in (0.1, 0.5, 0.9):
        reference = (1 - alpha) * base["w"].double() + alpha * tuned["w"].double()
        assert torch.allclose(interpolate(base, tuned, alpha)["w"].double(), reference, atol=1e-6)
    assert torch.equal(interpolate(base, tuned, 0.0)["w"], base["w"])
    assert torch.equal(interpolate(base, tuned, 1.0)["w"], tuned["w"])


def test_interpolation_errors_name_the_problem() -> None:
    one = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(KeyError, match=r"1 only in base \(e.g. \['b'\]\), 0 only in fine-tuned"):
        interpolate(one, {"a": torch.zeros(2)}, 0.5)
    with pytest.raises(ValueError, match=r"b: base has shape \(2,\), fine-tuned \(3,\)"):
        interpolate(one, {"a": torch.zeros(2), "b": torch.zeros(3)}, 0.5)
    with pytest.raises(ValueError, match=r"ids: torch.int64 / torch.int64 tensors differ between base and fine-tuned"):
        interpolate({"ids": torch.arange(2)}, {"ids": torch.arange(1, 3)}, 0.5)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        interpolate(one, one, 1.5)


def test_lora_is_interpolated_as_merged_weights() -> None:
    base = tiny()
    model = tiny()
    method = build_method(LoraConfig(rank=4, alpha=8))
    method.apply(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    adapted = features(model)
    space = weight_space(model, method)
    assert space.kind == "backbone" and set(space.state) == set(base.state_dict())

    space.load(interpolate(base.state_dict(), space.state, 0.0))
    assert all(torch.equal(got, want) for got, want in zip(features(space.model.eval()), features(base)))
    space.load(interpolate(base.state_dict(), space.state, 1.0))
    assert all(torch.allclose(got, want, atol=1e-5) for got, want in zip(features(space.model), adapted))
    # for plain LoRA, mixing merged weights == scaling the update B @ A by alpha
    space.load(interpolate(base.state_dict(), space.state, 0.5))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
    assert all(torch.allclose(got, want, atol=1e-5) for got, want in zip(features(space.model), features(model)))


def test_full_fine_tuning_is_interpolated_in_its_trained_parameters() -> None:
    base = tiny()
    model = tiny()
    method = build_method(FullConfig(lock_image=True))
    method.apply(model)
    with torch.no_grad():
        for param in method.trainable_state(model).values():
            param.add_(0.05)
    tuned = features(model)
    space = weight_space(model, method)
    assert space.kind == "trainable" and set(space.state) == set(model.tower_parameter_names("text")) | {"model.logit_scale"}
    base_state = {k: v for k, v in base.state_dict().items() if k in space.state}
    space.load(interpolate(base_state, space.state, 0.0))
    assert all(torch.equal(got, want) for got, want in zip(features(space.model), features(base)))
    space.load(interpolate(base_state, space.state, 1.0))
    assert all(torch.equal(got, want) for got, want in zip(features(space.model), tuned))
    space.load(interpolate(base_state, space.state, 0.5))
    assert torch.allclose(space.model.state_dict()["model.text_projection"],
                          base.state_dict()["model.text_projection"] + 0.025, atol=1e-6)


# --- the sweep on a trained run --------------------------------------------------------------

def write_swapped_labels(manifest: Path) -> Path:
    """The same images with every label moved to the next colour: a model that is right is always wrong here."""
    rows = list(csv.DictReader(manifest.open()))
    nxt = {"red": "green", "green": "blue", "blue": "red"}
    swapped = manifest.with_name("swapped.csv")
    with open(swapped, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "label": nxt[row["label"]]} for row in rows)
    return swapped


def zeroshot_task(name: str, manifest: Path) -> dict:
    return {"name": name, "task": "zeroshot", "templates": ["a {} square"],
            "data": {"format": "csv", "path": str(manifest), "label_key": "label"}}


@pytest.mark.parametrize("method", [{"name": "lora", "rank": 4, "alpha": 8}, {"name": "full"}])
def test_sweep_picks_the_validation_best_alpha_and_writes_it(method: dict, colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=8, lr=1e-2 if method["name"] == "lora" else 1e-3)
    recipe["method"] = method
    recipe["eval"] = [zeroshot_task("val", colour_squares), zeroshot_task("val_swapped", write_swapped_labels(colour_squares)),
                      {"name": "retrieval", "task": "retrieval",
                       "data": {"format": "csv", "path": str(colour_squares), "caption_separator": "|"}}]
    run_dir = train(config_lib.load(RunConfig, None, [], base=recipe)).run_dir

    summary = wise_ft_sweep(run_dir, alphas=[1.0, 0.0], select_on="val")
    table = {row["alpha"]: row for row in summary["results"]}
    assert sorted(table) == [0.0, 1.0] and summary["metric"] == "acc1"
    assert all(set(row["tasks"]) == {"val", "val_swapped", "retrieval"} for row in table.values())
    assert "mean_recall" in table[1.0]["tasks"]["retrieval"]["main_metric"]
    acc = {alpha: {name: row["tasks"][name]["metrics"]["acc1"] for name in ("val", "val_swapped")}
           for alpha, row in table.items()}
    # the scenario: fine-tuning solves the squares (hence fails every swapped label), the random base does not
    assert acc[1.0] == {"val": 1.0, "val_swapped": 0.0}
    assert acc[0.0]["val"] < 1.0 and acc[0.0]["val_swapped"] > 0.0
    assert summary["chosen_alpha"] == 1.0 and summary["chosen_value"] == 1.0
    assert json.loads((run_dir / "wise_ft" / "wise_ft.json").read_text()) == summary

    swapped = wise_ft_sweep(run_dir, alphas=[0.0, 1.0], select_on="val_swapped", out_dir=tmp_path / "swapped")
    assert swapped["chosen_alpha"] == 0.0 and swapped["chosen_value"] == acc[0.0]["val_swapped"]

    set_seed(0)
    base_state = create_backbone(TINY).state_dict()
    finetuned, _, _ = load_trained(run_dir)
    if method["name"] == "lora":  # merged weights: a full backbone
        kind, file, expected = "backbone", "model.safetensors", merged_backbone(finetuned).state_dict()
    else:
        kind, file, expected = "trainable", "trainable.safetensors", load_file(str(run_dir / "model" / "trainable.safetensors"))
    assert summary["weights_kind"] == kind and summary["weights_file"] == file
    chosen, base_pick = (load_file(str(folder / file)) for folder in (run_dir / "wise_ft", tmp_path / "swapped"))
    assert chosen.keys() == expected.keys() and all(torch.equal(chosen[k], expected[k]) for k in expected)
    assert all(torch.equal(base_pick[k], base_state[k]) for k in base_pick)

    with pytest.raises(ValueError, match=r"select_on='test' is not an eval task of .* "
                                         r"\(tasks: \['val', 'val_swapped', 'retrieval'\]\)"):
        wise_ft_sweep(run_dir, alphas=[0.5], select_on="test")
    with pytest.raises(ValueError, match=r"WiSE-FT alphas must lie in \[0, 1\], got \[-0.1\]"):
        wise_ft_sweep(run_dir, alphas=[-0.1, 0.5], select_on="val")


def _row(alpha: float, value: float, **scores: float) -> dict:
    tasks = {name: {"dataset": name, "task": "zeroshot_classification", "metrics": {"acc1": v}}
             for name, v in scores.items()}
    return {"alpha": alpha, "selection_value": value, "tasks": tasks}


def test_choose_alpha_respects_the_retention_floor() -> None:
    from domainclip.core.wise_ft import choose_alpha, retention_ratios

    rows = [_row(0.0, 0.5, ref=0.80), _row(0.5, 0.7, ref=0.78), _row(0.7, 0.8, ref=0.76), _row(1.0, 0.9, ref=0.40)]
    retention_ratios(rows, ["ref"])
    assert [round(r["retention"]["ref"], 4) for r in rows] == [1.0, 0.975, 0.95, 0.5]
    assert choose_alpha(rows) == (1.0, 0.9)
    assert choose_alpha(rows, 0.95) == (0.7, 0.8)  # 0.76 / 0.80 = 0.95 exactly: kept
    assert choose_alpha(rows, 0.96) == (0.5, 0.7)
    assert choose_alpha(rows, 1.0) == (0.0, 0.5)


def test_sweep_with_min_retention_writes_the_curve(colour_squares: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from domainclip.core.cli import main

    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=8, lr=1e-3)
    recipe["method"] = {"name": "full"}
    swapped = zeroshot_task("reference", write_swapped_labels(colour_squares))
    swapped["retention"] = True  # fine-tuning destroys it: alpha 1 keeps 0 % of the base's score
    recipe["eval"] = [zeroshot_task("val", colour_squares), swapped]
    run_dir = train(config_lib.load(RunConfig, None, [], base=recipe)).run_dir
    assert main(["wise-ft", str(run_dir), "--select-on", "val", "--alphas", "0.5,1", "--min-retention", "0.95"]) == 0
    summary = json.loads(capsys.readouterr().out)
    table = {row["alpha"]: row for row in summary["results"]}
    assert sorted(table) == [0.0, 0.5, 1.0]  # alpha 0 added: the base's own score
    assert table[1.0]["retention"]["reference"] == 0.0 and table[0.0]["retention"]["reference"] == 1.0
    eligible = [a for a, row in table.items() if row["retention"]["reference"] >= 0.95]
    assert summary["chosen_alpha"] in eligible and summary["chosen_alpha"] != 1.0
    assert summary["chosen_value"] == max(table[a]["selection_value"] for a in eligible)
    assert summary["min_retention"] == 0.95 and summary["retention_tasks"] == ["reference"]
    assert (run_dir / "wise_ft" / "wise_ft.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match=r"min_retention must be in \(0, 1\]"):
        wise_ft_sweep(run_dir, alphas=[0.5], select_on="val", min_retention=95)


def test_distill_runs_are_swept_and_fitted_methods_refused(colour_squares: Path, tmp_path: Path) -> None:
    """distill's training-only projection to the teacher is left out of the interpolation; a probe or a
    Tip-Adapter cache fitted from data has no base counterpart, which is said up front."""
    from ..tiny_models import save_tiny_hf

    def run(name: str, method: dict, model: dict | None = None) -> Path:
        recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=1)
        recipe.update(name=name, eval=[zeroshot_task("squares", colour_squares)], method=method)
        if model:
            recipe["model"] = model
        return train(config_lib.load(RunConfig, None, (), base=recipe)).run_dir

    teacher = run("teacher", {"name": "full"})
    student = {"kind": "hf", "name": str(save_tiny_hf(tmp_path / "hf", "clip"))}  # another width than the teacher
    distilled = run("distill", {"name": "distill", "teacher": {"run": str(teacher)},
                                "cache_dir": str(tmp_path / "cache")}, student)
    summary = wise_ft_sweep(distilled, [0.0, 1.0], "squares")
    assert summary["weights_kind"] == "trainable" and [row["alpha"] for row in summary["results"]] == [0.0, 1.0]
    saved = load_file(str(distilled / "wise_ft" / "trainable.safetensors"))
    assert saved and not [name for name in saved if name.startswith("distill_projection.")]
    for name, method in (("probe", {"name": "linear_probe", "c_values": [1.0], "cache_dir": str(tmp_path / "cache")}),
                         ("tip", {"name": "tip_adapter", "cache_dir": str(tmp_path / "cache")})):
        with pytest.raises(ValueError, match=rf"method '{method['name']}' fits its weights from the training data"):
            wise_ft_sweep(run(name, method), [0.0, 1.0], "squares")

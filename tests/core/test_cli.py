"""The command line: train, eval (base and run), config, errors, and the docs it generates."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from domainclip.core.cli import list_recipes, main, resolve_recipe
from domainclip.core.reference import recipe_reference_markdown

from ..conftest import tiny_recipe

REPO = Path(__file__).resolve().parents[2]


def test_recipe_reference_in_docs_is_current() -> None:
    assert (REPO / "docs" / "recipes.md").read_text() == recipe_reference_markdown(), \
        "docs/recipes.md is stale: run `domainclip config --reference > docs/recipes.md`"


def test_reference_documents_every_key() -> None:
    text = recipe_reference_markdown()
    for key in ("max_bad_fraction", "grad_accum", "unlocked_image_blocks", "caption_separator", "label_aware"):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}`"))
        assert row.rstrip(" |").split("|")[-1].strip(), f"{key} has no description"


def test_bundled_recipes_resolve_by_name() -> None:
    assert "examples/smoke" in list_recipes()
    assert resolve_recipe("examples/smoke").name == "smoke.yaml"
    with pytest.raises(FileNotFoundError, match="no bundled recipe of that name"):
        resolve_recipe("examples/nope")


def test_config_prints_resolved_recipe_with_overrides(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "examples/smoke", "train.lr=0.5"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["lr"] == 0.5
    assert Path(resolved["data"]["train"]["path"]).is_file()  # ${recipe_dir} expanded


def test_errors_exit_2_with_the_key(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "examples/smoke", "train.lrr=0.5"]) == 2
    assert "unknown key 'lrr'; did you mean 'lr'?" in capsys.readouterr().err


def test_train_then_eval_run_and_base(colour_squares: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2)
    recipe["eval"] = [{"name": "squares", "task": "zeroshot", "templates": ["a {} square"],
                       "data": {"format": "csv", "path": str(colour_squares), "label_key": "label"}}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run_dir = Path(summary["run_dir"])
    assert summary["global_step"] == 2
    trained = json.loads((run_dir / "metrics.json").read_text())[0]["metrics"]["acc1"]

    assert main(["eval", str(run_dir)]) == 0
    capsys.readouterr()
    again = json.loads((run_dir / "metrics_eval.json").read_text())[0]["metrics"]["acc1"]
    assert again == pytest.approx(trained)  # the saved weights reproduce the run's own numbers
    # a run's model cannot be changed by an override (it was only recorded); its eval tasks can
    with pytest.raises(SystemExit, match=r"override 'model.name=ViT-B-32' cannot apply to a trained run .* "
                                         r"overrides of eval\*, data.num_workers\*, token_merging\* only"):
        main(["eval", str(run_dir), "model.name=ViT-B-32"])
    assert main(["eval", str(run_dir), "eval.0.name=renamed"]) == 0
    capsys.readouterr()
    assert json.loads((run_dir / "metrics_eval.json").read_text())[0]["dataset"] == "renamed"
    # the precision guard checks the model as it is evaluated: with a token_merging override too
    from domainclip.core.eval import precision_guard
    from domainclip.core.token_merging import token_merging_key

    seen = []

    def spy(tasks, model, precisions, **kwargs):  # noqa: ANN001, ANN003
        seen.append(token_merging_key(model))
        return {"passed": True, "tasks": [], "precisions": precisions}

    monkeypatch.setattr(precision_guard, "run_precision_guard", spy)
    monkeypatch.setattr(precision_guard, "format_guard", lambda report: "ok")
    assert main(["precision-guard", str(run_dir), "token_merging.r=2", "--out", str(tmp_path / "guard.json")]) == 0
    assert seen and seen[0] is not None and seen[0]["r"] == 2

    assert main(["eval", str(path), "--out", str(tmp_path / "base.json")]) == 0
    base = json.loads((tmp_path / "base.json").read_text())
    assert base[0]["task"] == "zeroshot_classification" and base[0]["dataset"] == "squares"

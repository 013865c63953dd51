"""``domainclip compare``: k-shot runs per method and seed, the table, base-to-novel."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from domainclip.core.compare import CompareConfig, compare, harmonic_mean, load_spec
from domainclip.core.config import ConfigError

from ..conftest import tiny_recipe


def write_spec(tmp_path: Path, manifest: Path, **spec: object) -> Path:
    recipe = tiny_recipe(manifest, tmp_path / "unused", max_steps=3)
    recipe["data"]["train"] = {"format": "csv", "path": str(manifest), "label_key": "label",
                               "templates": ["a {} square"]}
    recipe["eval"] = [{"name": "squares", "task": "zeroshot", "templates": ["a {} square"],
                       "data": {"format": "csv", "path": str(manifest), "label_key": "label"}}]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    values = {"name": "cmp", "recipe": "recipe.yaml", "output_dir": str(tmp_path / "out"), "shots": [1, 2],
              "seeds": [0, 1], "methods": {"full": {"method": {"name": "full"}},
                                           "lit": {"method": {"name": "full", "lock_image": True}}}}
    values.update(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_few_shot_comparison_table(colour_squares: Path, tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, colour_squares, shots=[2])
    out = compare(load_spec(spec_path), spec_path.parent)
    result = json.loads((out / "compare.json").read_text())
    assert len(result["runs"]) == 2 * 2
    assert {(r["method"], r["shots"]) for r in result["table"]} == {("full", 2), ("lit", 2)}
    row = next(r for r in result["table"] if r["method"] == "lit" and r["shots"] == 2)
    runs = [r["scores"]["squares"] for r in result["runs"] if r["method"] == "lit" and r["shots"] == 2]
    assert row["squares"] == pytest.approx(sum(runs) / 2)
    full = next(r for r in result["table"] if r["method"] == "full")
    assert row["trainable_parameters"] < full["trainable_parameters"]  # the image tower is locked
    # each k-shot run really trained on k images per class
    config = yaml.safe_load((out / "runs" / "full_k2_s1" / "config.yaml").read_text())
    assert config["data"]["train"]["shots"] == 2 and config["data"]["batch_size"] == 6
    assert config["train"]["resume"] == "never"  # timings cover whole runs, never a resumed tail
    assert "| zero-shot base | 0 |" in (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 1000


def test_base_to_novel_reports_harmonic_mean(colour_squares: Path, tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, colour_squares, protocol="base_to_novel", shots=[2], seeds=[0],
                           methods={"full": {"method": {"name": "full"}}})
    out = compare(load_spec(spec_path), spec_path.parent)
    result = json.loads((out / "compare.json").read_text())
    row = result["table"][0]
    assert row["hm"] == pytest.approx(harmonic_mean(row["base"], row["novel"]))
    config = yaml.safe_load((out / "runs" / "full_k2_s0" / "config.yaml").read_text())
    assert config["data"]["train"]["class_subset"] == "base"
    assert [t["data"]["class_subset"] for t in config["eval"]] == ["base", "novel"]
    assert set(result["zero_shot"]) == {"base", "novel", "hm"}


def test_spec_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="protocol must be one of"):
        CompareConfig(methods={"a": {}}, protocol="zero")
    (tmp_path / "s.yaml").write_text("name: x\nmethod: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'method'; did you mean 'methods'\?"):
        load_spec(tmp_path / "s.yaml")


def test_an_interrupted_comparison_continues_where_it_stopped(colour_squares: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import domainclip.core.compare as compare_module

    spec_path = write_spec(tmp_path, colour_squares, shots=[2], seeds=[0])
    real_train, trained, killed = compare_module.train, [], []

    def counting_train(cfg):
        trained.append(cfg.name)
        if len(trained) == 2 and not killed:
            killed.append(cfg.name)
            raise SystemExit("killed")  # the process dies during the second run
        return real_train(cfg)

    monkeypatch.setattr(compare_module, "train", counting_train)
    with pytest.raises(SystemExit, match="killed"):
        compare(load_spec(spec_path), spec_path.parent)
    saved_path = tmp_path / "out" / "cmp" / "runs.json"
    saved = json.loads(saved_path.read_text())
    assert len(saved["runs"]) == 1
    del saved["spec"]["also"]  # written by a version before that field existed: its default applies
    saved_path.write_text(json.dumps(saved))
    trained.clear()
    out = compare(load_spec(spec_path), spec_path.parent)
    assert trained == ["lit_k2_s0"]  # the finished run is not repeated
    assert len(json.loads((out / "compare.json").read_text())["runs"]) == 2
    # a method added to the spec runs alone; a method whose settings changed runs again
    trained.clear()
    spec = yaml.safe_load(spec_path.read_text())
    spec["methods"]["lit2"] = {"method": {"name": "full", "lock_text": True}}
    spec["methods"]["lit"] = {"method": {"name": "full", "lock_image": True}, "train": {"lr": 1.0e-4}}
    spec_path.write_text(yaml.safe_dump(spec))
    out = compare(load_spec(spec_path), spec_path.parent)
    assert trained == ["lit_k2_s0", "lit2_k2_s0"]
    assert [r["method"] for r in json.loads((out / "compare.json").read_text())["runs"]] == ["full", "lit", "lit2"]
    # any other change of the spec starts afresh
    trained.clear()
    spec_path.write_text(spec_path.read_text().replace("seeds:\n- 0", "seeds:\n- 1"))
    compare(load_spec(spec_path), spec_path.parent)
    assert trained == ["full_k2_s1", "lit_k2_s1", "lit2_k2_s1"]
    # and so does an edit of the base recipe file, which the spec only names
    trained.clear()
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    recipe["train"]["lr"] = 5e-4
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    compare(load_spec(spec_path), spec_path.parent)
    assert trained == ["full_k2_s1", "lit_k2_s1", "lit2_k2_s1"]


def test_balanced_accuracy_can_be_the_tabulated_metric(colour_squares: Path, tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, colour_squares, shots=[2], seeds=[0], metric="balanced_accuracy",
                           methods={"full": {"method": {"name": "full"}}})
    out = compare(load_spec(spec_path), spec_path.parent)
    result = json.loads((out / "compare.json").read_text())
    [record] = json.loads((out / "runs" / "full_k2_s0" / "metrics.json").read_text())
    assert result["runs"][0]["scores"]["squares"] == pytest.approx(record["metrics"]["balanced_accuracy"])
    assert "metric balanced_accuracy" in (out / "compare.md").read_text()
    with pytest.raises(ValueError, match=r"metric must be one of \('acc1', 'balanced_accuracy'\), got 'auc'"):
        CompareConfig(methods={"a": {}}, metric="auc")


def test_also_tabulates_more_metrics_of_the_headline_task(colour_squares: Path, tmp_path: Path) -> None:
    spec_path = write_spec(tmp_path, colour_squares, shots=[2], seeds=[0], also=["acc5"],
                           methods={"full": {"method": {"name": "full"}}})
    out = compare(load_spec(spec_path), spec_path.parent)
    result = json.loads((out / "compare.json").read_text())
    [record] = json.loads((out / "runs" / "full_k2_s0" / "metrics.json").read_text())
    assert result["runs"][0]["scores"]["squares acc5"] == pytest.approx(record["metrics"]["acc5"])
    assert "squares acc5" in result["zero_shot"] and "| squares (acc5) |" in (out / "compare.md").read_text()
    with pytest.raises(ValueError, match=r"few_shot protocol only"):
        CompareConfig(methods={"a": {}}, protocol="base_to_novel", also=["auroc"])

"""Every mistake a user can make ends in one line (issue 11, section 2).

Exit code 2, one line on stderr naming the file / key / value and what to do, no traceback, and
nothing written to the run folder before the recipe is validated.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from domainclip.core import config as config_lib
from domainclip.core.cli import main as cli_main
from domainclip.core.run_config import RunConfig

from ..conftest import tiny_recipe


def write_recipe(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one stderr line and no traceback."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def recipe(colour_squares: Path, tmp_path: Path) -> Path:
    return write_recipe(tmp_path, tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2))


def test_override_typo_names_the_override_not_the_recipe(recipe: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_error(capsys, ["train", str(recipe), "train.lrr=1e-4"])
    assert "override 'train.lrr=1e-4'" in err and "did you mean 'lr'" in err
    assert str(recipe) not in err
    err = one_line_error(capsys, ["train", str(recipe), "data.batch_size=many"])
    assert "override 'data.batch_size=many'" in err and "expected int" in err
    assert not (tmp_path / "runs").exists()


def test_a_typo_in_the_file_still_names_the_file(recipe: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = yaml.safe_load(recipe.read_text())
    data["train"]["lrr"] = 1e-4
    recipe.write_text(yaml.safe_dump(data))
    err = one_line_error(capsys, ["train", str(recipe), "train.lr=1e-3"])
    assert str(recipe) in err and "unknown key 'lrr'" in err and "override" not in err


@pytest.mark.parametrize("section, key, suggestion", [
    ("train", "learning_rate", "train.lr"),
    ("", "learning_rate", "train.lr"),
    ("", "per_device_train_batch_size", "data.batch_size"),
    ("train", "per_device_train_batch_size", "data.batch_size"),
    ("train", "num_train_epochs", "train.epochs"),
    ("", "epochs", "train.epochs"),
    ("train", "weight_decay_rate", "train.weight_decay"),
    ("train", "gradient_accumulation_steps", "train.grad_accum"),
    ("train", "warmup_ratio", "train.warmup_steps"),
    ("train", "max_grad_norm", "train.grad_clip"),
    ("data", "dataloader_num_workers", "data.num_workers"),
])
def test_names_from_other_tools_suggest_the_kits_key(tmp_path: Path, section: str, key: str, suggestion: str) -> None:
    data = {section: {key: 1}} if section else {key: 1}
    path = write_recipe(tmp_path, data)
    with pytest.raises(config_lib.ConfigError, match=rf"unknown key '{key}'; did you mean '{suggestion}'\?"):
        config_lib.load(RunConfig, path)


def test_warmup_ratio_says_steps_are_counted() -> None:
    with pytest.raises(config_lib.ConfigError, match="counts warm-up in optimizer steps"):
        config_lib.load(RunConfig, None, ["train.warmup_ratio=0.1"])


@pytest.mark.parametrize("value", ["0", "-1e-4"])
def test_non_positive_learning_rate(recipe: Path, tmp_path: Path, value: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    err = one_line_error(capsys, ["train", str(recipe), f"train.lr={value}"])
    assert f"override 'train.lr={value}'" in err and "train.lr must be > 0" in err
    assert not (tmp_path / "runs").exists()


def test_warmup_at_or_past_total_steps_is_a_warning(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["train", str(recipe), "train.warmup_steps=2"]) == 0
    err = capsys.readouterr().err
    assert "warning: train.warmup_steps=2 is at or past the 2 total steps" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"domainclip {version('domainclip')}"


def test_paths_relative_to_another_folder_name_image_root(colour_squares: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    moved = tmp_path / "elsewhere" / "train.csv"  # the manifest moved away from its images
    moved.parent.mkdir()
    moved.write_text(colour_squares.read_text())
    path = write_recipe(tmp_path, tiny_recipe(moved, tmp_path / "runs", max_steps=2))
    err = one_line_error(capsys, ["train", str(path)])
    assert "24 of 24 image paths of data.train" in err and str(moved) in err
    assert "data.train.image_root" in err and str(moved.parent) in err
    assert not (tmp_path / "runs").exists()
    # with image_root the same manifest trains
    fixed = write_recipe(tmp_path, tiny_recipe(moved, tmp_path / "runs", max_steps=1), "fixed.yaml")
    data = yaml.safe_load(fixed.read_text())
    data["data"]["train"]["image_root"] = str(colour_squares.parent)
    fixed.write_text(yaml.safe_dump(data))
    assert cli_main(["train", str(fixed)]) == 0


def test_too_many_unreadable_images_mid_run_is_one_line(colour_squares: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(0, 24, 3):  # the files exist but are not images
        (colour_squares.parent / "img" / f"{i}.jpg").write_bytes(b"not a jpeg")
    path = write_recipe(tmp_path, tiny_recipe(colour_squares, tmp_path / "runs", max_steps=4))
    err = one_line_error(capsys, ["train", str(path)])
    assert "data items were bad" in err and "data.max_bad_fraction" in err


def test_pickled_weights_in_the_recipe_write_nothing(colour_squares: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "base.PT"
    torch.save({"w": torch.zeros(1)}, weights)
    path = write_recipe(tmp_path, tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2))
    err = one_line_error(capsys, ["train", str(path), f"model.pretrained={weights}"])
    assert str(weights) in err and "domainclip convert-weights" in err
    assert not (tmp_path / "runs").exists()


def test_a_real_process_prints_no_traceback(recipe: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "domainclip.core.cli", "train", str(recipe), "train.lr=-1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "domainclip train: error: override 'train.lr=-1': train: train.lr must be > 0, got -1.0 (the peak learning "
        "rate, e.g. 1e-5 for a full fine-tune, 1e-4 for LoRA)"]

"""Recipe validation: unknown keys name the closest valid key, overrides, tagged sections, round trip."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from domainclip.core import config as config_lib
from domainclip.core.config import ConfigError
from domainclip.core.methods.full import FullConfig
from domainclip.core.run_config import RunConfig


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_names_file_and_closest_key(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"learning_rate": 0.1, "lr": 0.2}})
    with pytest.raises(ConfigError) as err:
        config_lib.load(RunConfig, path)
    message = str(err.value)
    assert str(path) in message and "train" in message
    assert "unknown key 'learning_rate'" in message


def test_typo_suggests_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'batchsize'; did you mean 'batch_size'\?"):
        config_lib.load(RunConfig, write(tmp_path, {"data": {"batchsize": 4}}))


def test_tagged_method_section_picks_subclass_and_validates_its_keys(tmp_path: Path) -> None:
    cfg = config_lib.load(RunConfig, write(tmp_path, {"method": {"name": "full", "lock_image": True}}))
    assert isinstance(cfg.method, FullConfig) and cfg.method.lock_image
    with pytest.raises(ConfigError, match=r"unknown value 'ful'; valid: .*did you mean 'full'\?"):
        config_lib.load(RunConfig, write(tmp_path, {"method": {"name": "ful"}}))
    with pytest.raises(ConfigError, match=r"unknown key 'lock_images'; did you mean 'lock_image'\?"):
        config_lib.load(RunConfig, write(tmp_path, {"method": {"name": "full", "lock_images": True}}))


def test_overrides_are_typed_and_validated(tmp_path: Path) -> None:
    path = write(tmp_path, {"train": {"lr": 0.1}})
    cfg = config_lib.load(RunConfig, path, ["train.lr=3e-4", "data.batch_size=7", "method.lock_text=true",
                                            "data.train.templates=['a {}', 'the {}']"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.data.batch_size == 7
    assert cfg.method.lock_text is True and cfg.data.train.templates == ["a {}", "the {}"]
    with pytest.raises(ConfigError, match=r"data.batch_size.*expected int, got 'many'"):
        config_lib.load(RunConfig, path, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config_lib.load(RunConfig, path, ["train.lr"])


def test_value_checks_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.precision must be one of \('auto', 'no', 'bf16', 'fp16'\), got 'fp8'"):
        config_lib.load(RunConfig, write(tmp_path, {"train": {"precision": "fp8"}}))
    with pytest.raises(ConfigError, match="data.max_bad_fraction must be in"):
        config_lib.load(RunConfig, write(tmp_path, {"data": {"max_bad_fraction": 2}}))


@pytest.mark.parametrize("override, message", [
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.max_steps=-3", "train.max_steps must be >= 0, got -3"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints must be >= 0"),
    ("train.betas=[0.9]", r"train.betas must be two numbers in \[0, 1\)"),
    ("train.min_lr_ratio=5", "train.min_lr_ratio must be between 0 and 1"),
    ("train.grad_clip=-1", "train.grad_clip must be >= 0"),
    ("data.num_workers=-2", "data.num_workers must be >= 0"),
    ("eval.1.name=x", r"override 'eval.1.name=x': eval has 1 item\(s\); index 1 is not one of them"),
    ("eval.first.name=x", r"override 'eval.first.name=x': eval is a list; index it with a number \(0 to 0\)"),
    ("model.preprocess.imagesize=64", r"model.preprocess: unknown key 'imagesize'; did you mean 'image_size'\?"),
    ("model.preprocess.interpolation=nearest", r"model.preprocess: .*interpolation must be 'bicubic' or 'bilinear'"),
])
def test_values_that_would_crash_or_train_nothing_are_refused_up_front(tmp_path: Path, override: str,
                                                                         message: str) -> None:
    path = write(tmp_path, {"eval": [{"name": "e", "task": "zeroshot"}]})
    with pytest.raises(ConfigError, match=message):
        config_lib.load(RunConfig, path, [override])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = config_lib.load(RunConfig, write(tmp_path, {"name": "x", "method": {"name": "full", "layer_decay": 0.8},
                                                      "eval": [{"name": "e", "task": "retrieval"}]}))
    saved = tmp_path / "resolved.yaml"
    config_lib.save(cfg, saved)
    again = config_lib.load(RunConfig, saved)
    assert config_lib.to_dict(again) == config_lib.to_dict(cfg)
    assert again.method.layer_decay == pytest.approx(0.8)
    assert again.eval[0].task == "retrieval"


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        config_lib.load(RunConfig, path)
    path.write_text("train: {lr: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_lib.load(RunConfig, path)


def test_bundled_recipes_find_the_shared_data_through_one_variable(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    from domainclip.core.config import shared_data_dir
    from domainclip.core.recipe_files import resolve_recipe
    from domainclip.core.run_config import RunConfig

    recipes = Path(__file__).resolve().parents[2] / "recipes"
    texts = {p: p.read_text() for p in recipes.rglob("*.yaml")}
    assert not [p for p, t in texts.items() if re.search(r"\$\{recipe_dir\}(/\.\.)+/shared", t)]
    assert sum("${shared_data}" in t for t in texts.values()) >= 20
    monkeypatch.setenv("DOMAINCLIP_SHARED_DATA", str(tmp_path / "elsewhere"))
    assert shared_data_dir() == tmp_path / "elsewhere"
    cfg = config_lib.load(RunConfig, resolve_recipe("remote_sensing/full"))
    assert cfg.data.train.path.startswith(str(tmp_path / "elsewhere") + "/")
    monkeypatch.delenv("DOMAINCLIP_SHARED_DATA")
    assert shared_data_dir() == recipes.parent.parent / "shared" / "data"


def test_override_values_yaml_would_change_are_kept_as_written(tmp_path: Path) -> None:
    path = write(tmp_path, {"data": {"train": {"format": "csv", "path": "x.csv"}}})
    cfg = config_lib.load(RunConfig, path, ["data.train.caption_separator=|", "name=my run #2", "train.max_steps=3"])
    assert (cfg.data.train.caption_separator, cfg.name, cfg.train.max_steps) == ("|", "my run #2", 3)
    with pytest.raises(ConfigError, match=r"override 'eval=\[unclosed': the value is not valid YAML"):
        config_lib.load(RunConfig, path, ["eval=[unclosed"])


def test_switching_the_method_by_override_drops_the_old_methods_keys(tmp_path: Path) -> None:
    path = write(tmp_path, {"method": {"name": "full", "lock_image": True}, "loss": {"name": "clip", "label_aware": True}})
    cfg = config_lib.load(RunConfig, path, ["method.rank=8", "method.name=lora", "loss.name=siglip"])
    assert (cfg.method.name, cfg.method.rank, cfg.loss.name) == ("lora", 8, "siglip")
    same = config_lib.load(RunConfig, path, ["method.name=full", "method.layer_decay=0.5"])  # no switch: keys kept
    assert same.method.lock_image and same.method.layer_decay == 0.5

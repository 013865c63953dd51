"""The training loop on 2 processes (gloo, CPU) ends with the weights of 1 process on the same global batch."""
from __future__ import annotations

import json
import re
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ..conftest import tiny_recipe

pytestmark = pytest.mark.slow
ACCELERATE = Path(sys.executable).with_name("accelerate")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_recipe(path: Path, manifest: Path, out: Path, name: str, batch_size: int, variant: str,
                 teacher: Path | None = None) -> Path:
    recipe = tiny_recipe(manifest, out, max_steps=4, save_every=2, cpu=True)
    recipe["name"] = name
    recipe["data"]["batch_size"] = batch_size
    recipe["loss"] = {"name": "clip", "label_aware": True}
    recipe["eval"] = [{"name": "squares", "task": "zeroshot", "templates": ["a {} square"],
                       "data": {"format": "csv", "path": str(manifest), "label_key": "label"}}]
    if variant == "filip_rerank":  # token features gathered with gradient; re-ranked retrieval gathered for metrics
        recipe["loss"] = {"name": "filip", "clip_weight": 1.0, "filip_weight": 1.0, "chunk_size": 3}
        recipe["eval"].append({"name": "squares_retrieval", "task": "retrieval", "rerank": {"name": "filip", "k": 5},
                               "data": {"format": "csv", "path": str(manifest), "caption_separator": "|"}})
    elif variant == "distill":  # the teacher's embeddings come from a feature cache both processes share
        recipe["method"] = {"name": "distill", "teacher": {"run": str(teacher)}, "feature_weight": 2.0,
                            "affinity_weight": 1.0, "cache_dir": str(out / f"cache_{name}")}
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("variant", ["clip", "filip_rerank", "distill"])
def test_two_processes_train_like_one(variant: str, colour_squares: Path, tmp_path: Path) -> None:
    if not ACCELERATE.exists():
        pytest.skip(f"no accelerate launcher at {ACCELERATE}")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("DOMAINCLIP_FAULT", None)
    teacher = None
    if variant == "distill":
        teacher_recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2)
        teacher_recipe["name"] = "teacher"
        (tmp_path / "teacher.yaml").write_text(yaml.safe_dump(teacher_recipe))
        made = subprocess.run([sys.executable, "-m", "domainclip.core.cli", "train", str(tmp_path / "teacher.yaml")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stderr[-4000:]
        teacher = tmp_path / "runs" / "teacher"
    # 2 processes x 4 images: Accelerate gives process 0 batches 0, 2, ... and process 1 batches 1, 3, ...
    # of the same order, so each global step holds exactly the 8 images of the 1-process batch.
    two = write_recipe(tmp_path / "two.yaml", colour_squares, tmp_path / "runs", "two", 4, variant, teacher)
    launched = subprocess.run(
        [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(free_port()), "-m", "domainclip.core.cli", "train", str(two)],
        env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-4000:]
    one = write_recipe(tmp_path / "one.yaml", colour_squares, tmp_path / "runs", "one", 8, variant, teacher)
    single = subprocess.run([sys.executable, "-m", "domainclip.core.cli", "train", str(one)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]

    runs = tmp_path / "runs"
    a = load_file(str(runs / "one" / "model" / "trainable.safetensors"))
    b = load_file(str(runs / "two" / "model" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert not torch.equal(a["model.visual.proj"], load_file(str(runs / "one" / "checkpoints" / "step_0000002" /
                                                                  "trainable.safetensors"))["model.visual.proj"])
    losses = [[json.loads(line)["train/loss"] for line in (runs / name / "logs" / "train_metrics.jsonl").open()]
              for name in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # the logged loss is the global loss
    state = json.loads((runs / "two" / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert {p.name for p in (runs / "two" / "checkpoints" / "step_0000004").glob("rng_*.safetensors")} == \
        {"rng_0.safetensors", "rng_1.safetensors"}
    metrics = [json.loads((runs / name / "metrics.json").read_text()) for name in ("one", "two")]
    assert metrics[0][0]["metrics"]["acc1"] == pytest.approx(metrics[1][0]["metrics"]["acc1"])
    if variant == "filip_rerank":
        one_retrieval, two_retrieval = metrics[0][1]["metrics"], metrics[1][1]["metrics"]
        assert one_retrieval["rerank"] == "filip@5" and one_retrieval["n_captions"] == 48
        assert {k: v for k, v in two_retrieval.items() if k.startswith("reranked_")} == pytest.approx(
            {k: v for k, v in one_retrieval.items() if k.startswith("reranked_")})
    if variant == "distill":
        assert len(list((runs / "cache_two").rglob("shard-*"))) >= 2  # one cache, written once, read by both


def add_broken_images(manifest: Path, count: int) -> None:
    """``count`` unreadable files appended to the colour squares' manifest."""
    with open(manifest, "a") as handle:
        for i in range(count):
            (manifest.parent / "img" / f"broken{i}.jpg").write_text("not an image")
            handle.write(f"img/broken{i}.jpg,a red square,red\n")


def launch_two(recipe: dict, path: Path, fault: str = "") -> subprocess.CompletedProcess:
    """``recipe`` written to ``path`` and trained by 2 CPU processes (gloo), killed at ``fault`` if given."""
    if not ACCELERATE.exists():
        pytest.skip(f"no accelerate launcher at {ACCELERATE}")
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("DOMAINCLIP_FAULT", None)
    if fault:
        env["DOMAINCLIP_FAULT"] = fault
    return subprocess.run(
        [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(free_port()), "-m", "domainclip.core.cli", "train", str(path)],
        env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_killed_and_resumed_list_every_bad_input_once(colour_squares: Path, tmp_path: Path) -> None:
    """Each process's bad-input report is checkpointed and resumed (a checkpoint held only the main
    process's, which every process then merged: its counts doubled and the other's were lost)."""
    add_broken_images(colour_squares, 6)

    def launch(name: str, fault: str = "") -> subprocess.CompletedProcess:
        recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=6, save_every=3, cpu=True)
        recipe["name"], recipe["data"]["batch_size"], recipe["data"]["max_bad_fraction"] = name, 4, 0.5
        return launch_two(recipe, tmp_path / f"{name}.yaml", fault)

    straight = launch("straight")
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert launch("killed", fault="after_save:3").returncode != 0
    state = json.loads((tmp_path / "runs" / "killed" / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    by_process = state["bad_inputs_by_process"]
    assert len(by_process) == 2 and all(report["bad"] > 0 for report in by_process)  # both met broken images
    resumed = launch("killed")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    reports = [json.loads((tmp_path / "runs" / name / "bad_inputs.json").read_text()) for name in ("straight", "killed")]
    assert reports[0]["seen"] == 6 * 8 and reports[0]["bad"] >= 2  # 6 steps of 2 x 4 items, good and bad
    for key in ("seen", "bad", "occurrences", "total"):
        assert reports[1][key] == reports[0][key], key
    assert sorted(item["path"] for item in reports[1]["items"]) == sorted(item["path"] for item in reports[0]["items"])


def test_two_processes_stop_when_their_bad_inputs_together_pass_the_limit(colour_squares: Path,
                                                                         tmp_path: Path) -> None:
    """6 of 30 items broken, limit 10 %: in 4 steps (batches drop their last partial one) the two
    processes meet 4 different broken items (13 %), neither alone more than 3 (10 %), so only their
    reports together stop the run."""
    add_broken_images(colour_squares, 6)
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=4, cpu=True)
    recipe["data"]["batch_size"], recipe["data"]["max_bad_fraction"] = 4, 0.1
    launched = launch_two(recipe, tmp_path / "two.yaml")
    assert launched.returncode != 0
    assert re.search(r"4 of 30 data items were bad \(13\.33%\), more than the limit 10\.00%", launched.stderr), \
        launched.stderr[-3000:]
    assert not (tmp_path / "runs" / "tiny" / "model").exists()

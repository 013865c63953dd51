"""Crash safety: a run killed (SIGKILL) and resumed ends with the same weights as an uninterrupted one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from domainclip.core import checkpoint as checkpoint_module
from domainclip.core.checkpoint import begin_checkpoint, commit_checkpoint, latest_checkpoint

from ..conftest import tiny_recipe

pytestmark = pytest.mark.slow


def run_cli(recipe: Path, fault: str = "", overrides: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("DOMAINCLIP_FAULT", None)
    if fault:
        env["DOMAINCLIP_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "domainclip.core.cli", "train", str(recipe), *overrides],
                          env=env, capture_output=True, text=True, timeout=300)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "trainable.safetensors"))


@pytest.fixture
def recipes(colour_squares: Path, tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("straight", "killed_after", "killed_mid"):
        data = tiny_recipe(colour_squares, tmp_path / "runs", save_every=3, seed=3)
        data["name"] = name
        data["data"]["num_workers"] = 1  # a worker process must not change the result either
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        out[name] = path
    return out


def test_kill_and_resume_matches_uninterrupted_run(recipes: dict[str, Path], tmp_path: Path) -> None:
    straight = run_cli(recipes["straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = final_weights(tmp_path / "runs" / "straight")

    # Killed right after checkpoint 3 was committed.
    killed = run_cli(recipes["killed_after"], fault="after_save:3")
    assert killed.returncode == -signal.SIGKILL
    run_dir = tmp_path / "runs" / "killed_after"
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_0000003"
    assert not (run_dir / "model").exists()
    resumed = run_cli(recipes["killed_after"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 3" in (run_dir / "logs" / "train.log").read_text()
    assert "resumed from step 3" in resumed.stderr  # on the console too
    got = final_weights(run_dir)
    assert got.keys() == reference.keys()
    for name in reference:
        assert torch.equal(got[name], reference[name]), name

    # Killed half-way through writing checkpoint 6: checkpoint 3 stays the loadable latest.
    killed = run_cli(recipes["killed_mid"], fault="mid_save:6")
    assert killed.returncode == -signal.SIGKILL
    run_dir = tmp_path / "runs" / "killed_mid"
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_0000003"
    assert (run_dir / "checkpoints" / ".tmp-step_0000006").is_dir()
    resumed = run_cli(recipes["killed_mid"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = final_weights(run_dir)
    for name in reference:
        assert torch.equal(got[name], reference[name]), name
    assert not (run_dir / "checkpoints" / ".tmp-step_0000006").exists()


def test_resume_refuses_a_changed_recipe(recipes: dict[str, Path], tmp_path: Path) -> None:
    killed = run_cli(recipes["killed_after"], fault="after_save:3")
    assert killed.returncode == -signal.SIGKILL
    changed = run_cli(recipes["killed_after"], overrides=("data.batch_size=4",))
    assert changed.returncode == 2
    assert "data.batch_size changed (8 -> 4)" in changed.stderr and "name=NEW_NAME" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1


def test_a_recommit_killed_at_any_moment_keeps_one_complete_checkpoint(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "checkpoints"
    for step in (3, 6):
        tmp = begin_checkpoint(root, step)
        (tmp / "state.json").write_text(f"first {step}")
        commit_checkpoint(tmp, step)
    assert latest_checkpoint(root).name == "step_0000006"
    # the same step saved again, killed between moving the old folder aside and putting the new one in
    (begin_checkpoint(root, 6) / "state.json").write_text("second 6")
    real_replace = checkpoint_module.os.replace
    calls = []

    def killed(source, target):  # noqa: ANN001
        calls.append(Path(source).name)
        if Path(source).name.startswith(".tmp-"):
            raise KeyboardInterrupt  # stands in for SIGKILL
        real_replace(source, target)

    monkeypatch.setattr(checkpoint_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        commit_checkpoint(root / ".tmp-step_0000006", 6)
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    assert calls == ["step_0000006", ".tmp-step_0000006"] and not (root / "step_0000006").exists()
    found = latest_checkpoint(root)  # the folder moved aside is put back
    assert found.name == "step_0000006" and (found / "state.json").read_text() == "first 6"
    # a latest folder gone for another reason: the newest finished checkpoint, not a fresh start
    import shutil

    shutil.rmtree(found)
    assert latest_checkpoint(root).name == "step_0000003"


def test_a_rerun_after_the_final_checkpoint_saves_nothing_again(recipes: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "killed_after"
    killed = run_cli(recipes["killed_after"], fault="after_save:6")  # the last step: killed before the summary
    assert killed.returncode == -signal.SIGKILL and not (run_dir / "train_summary.json").exists()
    final = run_dir / "checkpoints" / "step_0000006"
    before = final.stat().st_ino
    resumed = run_cli(recipes["killed_after"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert final.stat().st_ino == before and (run_dir / "train_summary.json").is_file()


def test_a_kill_while_the_final_weights_are_saved_leaves_the_earlier_model_whole(recipes: dict[str, Path],
                                                                                    tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "straight"
    assert run_cli(recipes["straight"]).returncode == 0
    reference = final_weights(run_dir)
    (run_dir / "train_summary.json").unlink()  # as if killed after the model was saved, before the summary
    model_inode = (run_dir / "model").stat().st_ino
    killed = run_cli(recipes["straight"], fault="mid_model_save:6")
    assert killed.returncode == -signal.SIGKILL
    # the new weights went to .tmp-model; model/ is the earlier folder, untouched and complete
    assert (run_dir / ".tmp-model" / "trainable.safetensors").is_file()
    assert not (run_dir / ".tmp-model" / "model.json").exists()
    assert (run_dir / "model").stat().st_ino == model_inode and (run_dir / "model" / "model.json").is_file()
    got = final_weights(run_dir)
    assert all(torch.equal(got[name], reference[name]) for name in reference)
    resumed = run_cli(recipes["straight"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / ".tmp-model").exists() and not (run_dir / ".old-model").exists()
    assert (run_dir / "model").stat().st_ino != model_inode  # swapped in whole
    got = final_weights(run_dir)
    assert all(torch.equal(got[name], reference[name]) for name in reference)


def test_a_model_folder_swap_killed_between_its_renames_is_put_back(tmp_path: Path, monkeypatch) -> None:
    final, new = tmp_path / "model", tmp_path / ".tmp-model"
    final.mkdir()
    (final / "model.json").write_text("earlier")
    new.mkdir()
    (new / "model.json").write_text("new")
    real_replace = checkpoint_module.os.replace

    def killed(source, target):  # noqa: ANN001
        if Path(source) == new:
            raise KeyboardInterrupt  # stands in for SIGKILL
        real_replace(source, target)

    monkeypatch.setattr(checkpoint_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module.replace_folder(new, final)
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    assert not final.exists() and (tmp_path / ".old-model" / "model.json").read_text() == "earlier"
    assert checkpoint_module.restore_folder(final) and (final / "model.json").read_text() == "earlier"
    assert not checkpoint_module.restore_folder(final)  # nothing left to put back
    checkpoint_module.replace_folder(new, final)
    assert (final / "model.json").read_text() == "new" and not (tmp_path / ".old-model").exists()


def test_a_weights_file_written_again_is_never_left_half_written(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "trainable.safetensors"
    checkpoint_module.save_tensors({"w": torch.ones(4)}, path)

    def killed(fd: int) -> None:  # the new bytes are in the temporary file when the kill comes
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module.save_tensors({"w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert torch.equal(load_file(str(path))["w"], torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["trainable.safetensors"]


def test_rng_states_of_more_than_ten_gpus_go_back_to_their_own_device(monkeypatch) -> None:
    restored: list[torch.Tensor] = []
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(12)]
    monkeypatch.setattr(checkpoint_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(checkpoint_module.torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(checkpoint_module.torch.cuda, "set_rng_state_all", restored.extend)
    tensors, meta = checkpoint_module.capture_rng()
    checkpoint_module.restore_rng(dict(sorted(tensors.items())), meta)  # saved files list keys as text
    assert [int(state[0]) for state in restored] == list(range(12))

"""A run folder tells the truth (issue 11, section 1): resume rules, one writer, logs without
repeated steps, and the same evaluation numbers at the end of training and from ``domainclip eval``."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from domainclip.core.cli import main as cli_main
from domainclip.core.train.run_folder import RESUME_SAFE_KEYS, RunFolderError, RunLock, check_same_recipe

from ..conftest import tiny_recipe
from .test_train_resume import run_cli


def write_recipe(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def squares_eval(manifest: Path) -> list[dict]:
    return [{"name": "squares", "task": "zeroshot", "batch_size": 8,
             "data": {"format": "csv", "path": str(manifest), "label_key": "label", "caption_separator": "|",
                      "templates": ["a {} square"]}}]


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- resume rules -------------------------------------------------------------------------------

def test_only_documented_keys_may_change_on_resume(tmp_path: Path) -> None:
    saved = {"name": "a", "output_dir": "runs", "model": {"kind": "open_clip"}, "eval": [{"name": "x"}],
             "train": {"lr": 1e-3, "log_every": 10, "eval_every": 0, "progress": True, "resume": "auto"}}
    safe = {**saved, "output_dir": "/elsewhere/runs", "eval": [],
            "train": {**saved["train"], "log_every": 1, "eval_every": 5, "progress": False}}
    check_same_recipe(saved, safe, tmp_path / "config.yaml")  # no error
    changed = {**saved, "model": {"kind": "open_clip", "weights": "w.safetensors"},
               "train": {**saved["train"], "lr": 5e-4}}
    with pytest.raises(RunFolderError) as error:
        check_same_recipe(saved, changed, tmp_path / "config.yaml")
    message = str(error.value)
    assert "model.weights changed ('<absent>' -> 'w.safetensors')" in message
    assert "train.lr changed (0.001 -> 0.0005)" in message
    assert "name=NEW_NAME" in message and "train.resume=never" in message
    assert "eval" in RESUME_SAFE_KEYS and "train.log_every" in RESUME_SAFE_KEYS


def test_starting_over_removes_everything_of_the_earlier_run(colour_squares: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_recipe(tmp_path, {**tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2),
                                     "eval": squares_eval(colour_squares)})
    assert cli_main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "tiny"
    (run / "precision_guard.json").write_text("{}")
    assert {"model", "metrics.json", "bad_inputs.json", "train_summary.json"} <= {p.name for p in run.iterdir()}
    # killed right after the folder is prepared for a new run: nothing of the first run is left to pass for it
    from domainclip.core.train.run_folder import RunFolder

    def killed(self, message: str) -> None:  # the new run's first log line
        raise KeyboardInterrupt

    monkeypatch.setattr(RunFolder, "log", killed)
    with pytest.raises(KeyboardInterrupt):
        cli_main(["train", str(recipe), "train.resume=never", "train.lr=0.05"])
    left = {p.relative_to(run).as_posix() for p in run.rglob("*")}
    assert not left & {"model", "metrics.json", "bad_inputs.json", "train_summary.json", "checkpoints",
                       "precision_guard.json", "logs/train_metrics.jsonl"}, left
    assert "lr: 0.05" in (run / "config.yaml").read_text()


def test_finished_run_rerun_changes_no_file(colour_squares: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path, {**tiny_recipe(colour_squares, tmp_path / "runs", max_steps=3),
                                     "eval": squares_eval(colour_squares)})
    assert cli_main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "tiny"
    capsys.readouterr()
    before = file_hashes(run)
    assert "train.lock" not in before  # released at the end

    assert cli_main(["train", str(recipe), "train.log_every=2"]) == 0  # a safe change
    captured = capsys.readouterr()
    assert "already finished at step 3" in captured.err
    assert json.loads(captured.out)["global_step"] == 3
    assert file_hashes(run) == before

    assert cli_main(["train", str(recipe), "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "train.lr changed (0.001 -> 0.5)" in err and "name=NEW_NAME" in err
    assert file_hashes(run) == before


# --- one writer per run folder ---------------------------------------------------------------------

def test_lock_names_its_holder_and_is_released(tmp_path: Path) -> None:
    first = RunLock(tmp_path / "train.lock")
    assert first.acquire() == {}
    with pytest.raises(RunFolderError, match=rf"being written by another train process \(pid {os.getpid()} on "):
        RunLock(tmp_path / "train.lock").acquire()
    first.release()
    assert not (tmp_path / "train.lock").exists()
    second = RunLock(tmp_path / "train.lock")
    assert second.acquire() == {}
    second.release()


def test_loser_waits_for_a_holder_that_has_not_written_its_record_yet(tmp_path: Path) -> None:
    # the race CI once hit: the winner holds the flock but the file is still empty
    path = tmp_path / "train.lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    record = {"pid": 4242, "host": "winner-host", "started": "now"}
    writer = threading.Timer(0.3, lambda: os.pwrite(holder, json.dumps(record).encode(), 0))
    writer.start()
    try:
        with pytest.raises(RunFolderError, match=r"another train process \(pid 4242 on winner-host, started now\)"):
            RunLock(path).acquire()
    finally:
        writer.join()
        os.close(holder)


def test_stale_lock_of_a_dead_process_is_taken_over(colour_squares: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "train.lock").write_text(json.dumps({"pid": dead.pid, "host": "old-host", "started": "yesterday"}))
    recipe = write_recipe(tmp_path, tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2))
    assert cli_main(["train", str(recipe)]) == 0
    assert f"took over train.lock left by a process that is gone (pid {dead.pid} on old-host" in capsys.readouterr().err
    assert not (run / "train.lock").exists()


@pytest.mark.slow
def test_two_processes_started_together_one_trains(colour_squares: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_recipe(colour_squares, tmp_path / "runs", max_steps=120, log_every=40))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "domainclip.core.cli", "train", str(recipe)]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=600), p.returncode) for p in processes]
    codes = sorted(code for *_, code in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err, _ in results]
    winner = next(pid for pid, _, _, code in results if code == 0)
    loser_err = next(err for _, _, err, code in results if code == 2)
    assert f"is being written by another train process (pid {winner} on " in loser_err
    assert len(loser_err.strip().splitlines()) == 1
    lines = (tmp_path / "runs" / "tiny" / "logs" / "train_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [40, 80, 120]


# --- logs after kills ------------------------------------------------------------------------------

@pytest.mark.slow
def test_each_step_logged_once_after_three_kills(colour_squares: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = write_recipe(tmp_path, tiny_recipe(colour_squares, tmp_path / "runs", max_steps=8, save_every=2,
                                                tensorboard=True))
    # each kill happens half-way through a checkpoint, after steps past the last good one were logged
    for step in (4, 6, 8):
        killed = run_cli(recipe, fault=f"mid_save:{step}")
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = run_cli(recipe)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step 6" in done.stderr  # on the console, not only in train.log
    logs = tmp_path / "runs" / "tiny" / "logs"
    steps = [json.loads(line)["step"] for line in (logs / "train_metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    events = EventAccumulator(str(logs / "train"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, 9))


# --- the same numbers at the end of training and from `domainclip eval` ------------------------------------

def test_end_of_training_eval_equals_domainclip_eval(colour_squares: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(tmp_path, {**tiny_recipe(colour_squares, tmp_path / "runs", max_steps=3, precision="bf16"),
                                     "eval": squares_eval(colour_squares)})
    assert cli_main(["train", str(recipe)]) == 0
    run = tmp_path / "runs" / "tiny"
    assert cli_main(["eval", str(run)]) == 0
    capsys.readouterr()
    at_end = json.loads((run / "metrics.json").read_text())
    again = json.loads((run / "metrics_eval.json").read_text())
    assert [r["precision"] for r in at_end] == [r["precision"] for r in again] == ["fp32"]
    assert [r["metrics"] for r in at_end] == [r["metrics"] for r in again]

"""The run folder: resolved config, logs, checkpoints, final weights, metrics, bad-input report.

Layout of ``output_dir/name``::

    config.yaml          resolved recipe (every default filled in)
    checkpoints/         step_NNNNNNN folders + ``latest`` pointer (resume state)
    model/               trainable.safetensors (what the method trains) + model.json
    metrics.json         CLIP_benchmark-style evaluation records
    train_summary.json   steps, trainable parameters, time, throughput
    bad_inputs.json      every skipped input with its reason
    logs/                train.log, train_metrics.jsonl, TensorBoard events
    train.lock           while a ``train`` process writes the folder: its pid, host and start time

Resuming continues a run only under the recipe it was started with, except the keys in
:data:`RESUME_SAFE_KEYS` (docs/training.md, "Resuming").
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import tqdm
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .. import config as config_lib
from ..checkpoint import atomic_write_text, replace_folder, restore_folder, save_tensors
from ..data.bad_inputs import BadInputReport
from ..errors import UserError
from ..eval import write_metrics
from ..folder_lock import FolderLock, describe_holder
from ..methods import AdaptationMethod, TaskInfo
from ..run_config import RunConfig
from .checkpointing import fault_point, gather_bad_reports

# The only recipe keys that may differ between a run and its resume: they change what is evaluated,
# logged or shown, never the weights. Any other difference would make "continue exactly" a lie.
RESUME_SAFE_KEYS = ("name", "output_dir", "eval", "train.eval_every", "train.log_every", "train.progress",
                    "train.resume")
LOCK_FILE = "train.lock"
EVAL_METRICS_FILE = "eval_metrics.jsonl"  # in logs/: evaluations during training

log = logging.getLogger("domainclip.train")


class RunFolderError(UserError, ValueError):
    """The run folder cannot be written: another process holds it, or it holds another recipe."""


class RunLock(FolderLock):
    """One writer per run folder: ``train.lock``, held while a process trains (see :class:`FolderLock`)."""

    def __init__(self, path: Path):
        super().__init__(path, "train", "wait for it, stop it, or train under another name=...", RunFolderError)


class RunFolder:
    def __init__(self, path: Path, accelerator: Accelerator):
        self.path = Path(path)
        self.accelerator = accelerator
        self.checkpoints = self.path / "checkpoints"
        self.logs = self.path / "logs"
        self.lock = RunLock(self.path / LOCK_FILE)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, cfg: RunConfig) -> int | None:
        """Lock the folder, refuse to resume under a changed recipe, save the resolved config.

        Returns the final step of an already finished run (nothing is written then; the caller
        stops), else None. Every process gets the same answer or the same error.
        """
        outcome: Any = None
        if self.is_main:
            try:
                outcome = self._prepare_main(cfg)
            except UserError as error:  # every process raises it, none waits for the main one
                outcome = error
        if self.accelerator.num_processes > 1:
            outcome = broadcast_object_list([outcome])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _prepare_main(self, cfg: RunConfig) -> int | None:
        self.path.mkdir(parents=True, exist_ok=True)
        previous = self.lock.acquire()
        try:
            restore_folder(self.path / "model")  # a kill while the final weights were swapped in
            saved = self.path / "config.yaml"
            summary = self.path / "train_summary.json"
            if saved.is_file() and cfg.train.resume != "never":
                check_same_recipe(yaml.safe_load(saved.read_text()), config_lib.to_dict(cfg), saved)
                if summary.is_file():
                    step = int(json.loads(summary.read_text()).get("global_step", 0))
                    self.lock.release()
                    # console only: the run's train.log is not touched either
                    print(f"domainclip train: {self.path}: already finished at step {step}; nothing to do (evaluate "
                          f"it with domainclip eval {self.path}, or train.resume=never to train it again)",
                          file=sys.stderr, flush=True)
                    return step
            if cfg.train.resume == "never":  # started over: nothing of the earlier run may pass for this one's
                self.forget_earlier_run()
        except BaseException:
            self.lock.release()
            raise
        self.logs.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False, allow_unicode=True))
        for old in [h for h in log.handlers if getattr(h, "domainclip_run", False)]:
            log.removeHandler(old)  # an earlier run in this process
            old.close()
        handler = logging.FileHandler(self.logs / "train.log")
        handler.domainclip_run = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        if previous:
            self.say(f"took over {LOCK_FILE} left by a process that is gone ({describe_holder(previous)})")
        return None

    # what a finished (or interrupted) run leaves besides config.yaml and train.log
    EARLIER_RUN_FILES = ("train_summary.json", "metrics.json", "bad_inputs.json", "logs/train_metrics.jsonl",
                         "logs/eval_metrics.jsonl")
    EARLIER_RUN_FOLDERS = ("checkpoints", "model", ".tmp-model", ".old-model")

    def forget_earlier_run(self) -> None:
        """``train.resume=never``: remove an earlier run's checkpoints, model, metrics, bad-input list
        and precision-guard reports, so that the folder never pairs this config with another run's
        weights or figures (``train.log`` keeps its history)."""
        for name in self.EARLIER_RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        for guard in self.path.glob("precision_guard*.json"):
            guard.unlink()
        for name in self.EARLIER_RUN_FOLDERS:
            shutil.rmtree(self.path / name, ignore_errors=True)

    def release(self) -> None:
        """Give up the folder's lock (the end of ``train``, or an error)."""
        self.lock.release()

    def log(self, message: str) -> None:
        if self.is_main:
            log.info(message)

    def say(self, message: str, level: int = logging.INFO) -> None:
        """Log ``message`` and show it on the console (stderr: stdout carries the CLI's JSON)."""
        if self.is_main:
            log.log(level, message)
            print(f"domainclip train: {message}", file=sys.stderr, flush=True)

    def truncate_metrics(self, step: int) -> None:
        """Keep the ``train_metrics.jsonl`` and ``eval_metrics.jsonl`` lines of steps <= ``step``: a
        resumed run logs the rest again."""
        for name in ("train_metrics.jsonl", EVAL_METRICS_FILE):
            path = self.logs / name
            if not self.is_main or not path.is_file():
                continue
            lines = path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
            if len(kept) != len(lines):
                atomic_write_text(path, "".join(kept))

    def log_evaluation(self, records: list[dict[str, Any]]) -> None:
        """The records of an evaluation during training (``train.eval_every``), one JSON line each in
        ``logs/eval_metrics.jsonl`` (``metrics.json`` holds the final evaluation)."""
        if not self.is_main:
            return
        with open(self.logs / EVAL_METRICS_FILE, "a") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        for record in records:
            shown = {key: round(value, 4) for key, value in record.get("metrics", {}).items()
                     if isinstance(value, float)}
            self.log(f"eval at step {record.get('step')}: {record.get('dataset')} ({record.get('task')}) {shown}")

    def progress_bar(self, total: int, initial: int, enabled: bool) -> tqdm.tqdm:
        return tqdm.tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                         disable=not (enabled and self.is_main))

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        if self.is_main:
            with open(self.logs / "train_metrics.jsonl", "a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")

    def save_model(self, model, method: AdaptationMethod, cfg: RunConfig, task: TaskInfo, step: int) -> None:
        """Final weights: only what the method trained, plus how to rebuild the rest.

        Written into ``.tmp-model/`` and swapped in whole (:func:`replace_folder`): a kill at any
        moment leaves the earlier ``model/`` or the new one, never new weights beside an old
        ``model.json`` or a truncated file."""
        if not self.is_main:
            return
        final, partial = self.path / "model", self.path / ".tmp-model"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        save_tensors(method.trainable_state(model), partial / "trainable.safetensors")
        method.save_artifacts(model, partial)
        fault_point("mid_model_save", step)
        info = {"model": config_lib.to_dict(cfg.model), "method": config_lib.to_dict(cfg.method),
                "backbone": model.config_dict(), "task": asdict(task)}
        atomic_write_text(partial / "model.json", json.dumps(info, indent=2))
        replace_folder(partial, final)

    def write_bad_inputs(self, bad: BadInputReport, skipped_records: list[tuple[str, str]] = ()) -> None:
        """``bad_inputs.json``: unreadable items of all processes, plus manifest rows not loaded."""
        reports = gather_bad_reports(bad, self.accelerator)
        if not self.is_main:
            return
        merged = BadInputReport.merged(reports, bad.total)
        merged.write_json(self.path / "bad_inputs.json")
        if skipped_records:
            data = json.loads((self.path / "bad_inputs.json").read_text())
            data["skipped_records"] = [{"item": item, "reason": reason} for item, reason in skipped_records]
            atomic_write_text(self.path / "bad_inputs.json", json.dumps(data, indent=2))

    def write_metrics(self, metrics: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        if not self.is_main:
            return
        write_metrics(self.path / "metrics.json", metrics)
        atomic_write_text(self.path / "train_summary.json", json.dumps(extra, indent=2))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _is_safe(key: str) -> bool:
    return any(key == safe or key.startswith(safe + ".") for safe in RESUME_SAFE_KEYS)


def check_same_recipe(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Raise :class:`RunFolderError` listing every key (outside :data:`RESUME_SAFE_KEYS`) that differs."""
    old = {k: v for k, v in _flatten(saved).items() if not _is_safe(k)}
    new = {k: v for k, v in _flatten(current).items() if not _is_safe(k)}
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        listing = ", ".join(f"{k} changed ({old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r})" for k in changed)
        raise RunFolderError(
            f"{path} holds a run with a different recipe: {listing}. Resuming would not continue it exactly "
            f"(only {', '.join(RESUME_SAFE_KEYS)} may change). Start a new run with name=NEW_NAME, or pass "
            f"train.resume=never to train this one again from scratch")

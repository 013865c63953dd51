"""The run folder: resolved config, logs, checkpoints, final weights, metrics, bad-input report.

Layout of ``output_dir/name``::

    config.yaml          resolved recipe (every default filled in)
    checkpoints/         step_NNNNNNN folders + ``latest`` pointer (resume state)
    model/               trainable.safetensors (what the method trains) + model.json
    metrics.json         CLIP_benchmark-style evaluation records
    train_summary.json   steps, trainable parameters, time, throughput
    bad_inputs.json      every skipped input with its reason
    logs/                train.log, train_metrics.jsonl, TensorBoard events
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import tqdm
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object

from .. import config as config_lib
from ..checkpoint import atomic_write_text, save_tensors
from ..data.bad_inputs import BadInputReport
from ..eval import write_metrics
from ..methods import AdaptationMethod, TaskInfo
from ..run_config import RunConfig

# Changing these between a run and its resume would make "continue exactly" a lie.
RESUME_SENSITIVE = ("model", "method", "data", "loss")

log = logging.getLogger("domainclip.train")


class RunFolder:
    def __init__(self, path: Path, accelerator: Accelerator):
        self.path = Path(path)
        self.accelerator = accelerator
        self.checkpoints = self.path / "checkpoints"
        self.logs = self.path / "logs"

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, cfg: RunConfig) -> None:
        """Create the folder, refuse to resume under a changed recipe, save the resolved config."""
        with self.accelerator.main_process_first():
            if self.is_main:
                self.logs.mkdir(parents=True, exist_ok=True)
                saved = self.path / "config.yaml"
                if saved.is_file() and cfg.train.resume != "never":
                    _check_same_recipe(yaml.safe_load(saved.read_text()), config_lib.to_dict(cfg), saved)
                atomic_write_text(saved, yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False, allow_unicode=True))
                for old in [h for h in log.handlers if getattr(h, "domainclip_run", False)]:
                    log.removeHandler(old)  # an earlier run in this process
                    old.close()
                handler = logging.FileHandler(self.logs / "train.log")
                handler.domainclip_run = True
                handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
                log.addHandler(handler)
                log.setLevel(logging.INFO)

    def log(self, message: str) -> None:
        if self.is_main:
            log.info(message)

    def progress_bar(self, total: int, initial: int, enabled: bool) -> tqdm.tqdm:
        return tqdm.tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                         disable=not (enabled and self.is_main))

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        if self.is_main:
            with open(self.logs / "train_metrics.jsonl", "a") as handle:
                handle.write(json.dumps({"step": step, **values}) + "\n")

    def save_model(self, model, method: AdaptationMethod, cfg: RunConfig, task: TaskInfo) -> None:
        """Final weights: only what the method trained, plus how to rebuild the rest."""
        if not self.is_main:
            return
        folder = self.path / "model"
        folder.mkdir(exist_ok=True)
        save_tensors(method.trainable_state(model), folder / "trainable.safetensors")
        method.save_artifacts(model, folder)
        info = {"model": config_lib.to_dict(cfg.model), "method": config_lib.to_dict(cfg.method),
                "backbone": model.config_dict(), "task": asdict(task)}
        atomic_write_text(folder / "model.json", json.dumps(info, indent=2))

    def write_bad_inputs(self, bad: BadInputReport, skipped_records: list[tuple[str, str]] = ()) -> None:
        """``bad_inputs.json``: unreadable items of all processes, plus manifest rows not loaded."""
        reports = gather_object([bad.to_dict()]) if self.accelerator.num_processes > 1 else [bad.to_dict()]
        if not self.is_main:
            return
        merged = BadInputReport(total=bad.total)
        for report in reports:
            merged.merge(BadInputReport.from_dict(report))
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


def _check_same_recipe(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    old = {k: v for k, v in _flatten({s: saved.get(s) for s in RESUME_SENSITIVE}).items()}
    new = {k: v for k, v in _flatten({s: current.get(s) for s in RESUME_SENSITIVE}).items()}
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        raise ValueError(f"{path} holds a run with a different recipe ({', '.join(changed[:5])} changed); "
                         f"resuming would not continue it exactly. Use a new name=..., or train.resume=never to overwrite")

"""What a run folder holds, in words: ``domainclip show RUN`` and the lines ``train`` ends with.

Reads only the run folder (``config.yaml``, ``train_summary.json``, ``metrics.json``, ``model/``):
the recipe's name, the base model, the method and its settings, steps and training time, the
headline metric of every evaluation task (with the base model's score where the run measured
retention), and where the weights are.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .eval.headline import headline


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def metric_lines(metrics: list[dict[str, Any]]) -> list[str]:
    """One line per evaluation record: data set, headline metric, value, and the change from the base."""
    lines = []
    for record in metrics:
        try:
            name, value = headline(record)
        except ValueError:
            continue
        line = f"{record['dataset']}: {name} {value:.4f}"
        retention = record.get("retention")
        if retention:
            line += f" (base model {retention['before']:.4f}, {retention['change']:+.4f})"
        lines.append(line)
    return lines


def run_summary(run_dir: str | Path) -> str:
    """A readable summary of a run folder; ``FileNotFoundError`` when ``run_dir`` is not a run."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: {config_file} is missing")
    cfg = yaml.safe_load(config_file.read_text()) or {}
    summary = _read_json(run_dir / "train_summary.json", {})
    metrics = _read_json(run_dir / "metrics.json", [])
    model, method = cfg.get("model", {}), dict(cfg.get("method", {}))
    base = " ".join(str(model.get(k)) for k in ("kind", "name", "pretrained", "vision", "text") if model.get(k))
    method_name = method.pop("name", "?")
    settings = ", ".join(f"{k}={v}" for k, v in method.items() if v not in ("", None, [], {}))
    steps = summary.get("global_step")
    lines = [f"run: {run_dir}", f"recipe: {cfg.get('name', '?')}", f"base model: {base or '?'}",
             f"method: {method_name}" + (f" ({settings})" if settings else "")]
    if summary:
        seconds = summary.get("train_seconds")
        lines.append(f"training: {steps} steps, {summary.get('trainable_parameters', 0):,} trained parameters"
                     + (f", {seconds:.1f} s" if seconds is not None else ""))
    else:
        lines.append("training: not finished (no train_summary.json)")
    lines.append("metrics:" if metrics else "metrics: none (the run has no eval tasks or was not evaluated)")
    lines.extend(f"  {line}" for line in metric_lines(metrics))
    weights = sorted(p for p in (run_dir / "model").glob("*.safetensors")) if (run_dir / "model").is_dir() else []
    lines.append("weights: " + (", ".join(str(p) for p in weights) if weights else "none yet"))
    for extra in ("summary.png", "model/README.md"):
        if (run_dir / extra).is_file():
            lines.append(f"{'plot' if extra.endswith('png') else 'model card'}: {run_dir / extra}")
    return "\n".join(lines)

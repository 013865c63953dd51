"""Model cards generated from a run folder, never hand-filled.

``write_run_card(run_dir)`` writes ``RUN/model/README.md`` (Hugging Face card metadata:
license, base_model, datasets, tags, pipeline_tag and a ``model-index`` with the measured
metrics) and ``RUN/model/metadata.json`` (machine-readable: input, preprocessing, classes and
templates, training data, retention, package versions, config hash) from the run's resolved
config, metrics and summary. Domain templates in ``model_cards/templates/<domain>.md`` add the
prose a domain needs (the medical one says the model is not for clinical use).
"""
from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

from . import config as config_lib
from .checkpoint import atomic_write_text
from .run_config import RunConfig

PACKAGES = ("domainclip", "torch", "open_clip_torch", "transformers", "peft", "accelerate", "timm")


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def config_hash(cfg: RunConfig) -> str:
    text = json.dumps(config_lib.to_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_model_id(cfg: RunConfig) -> str:
    model = cfg.model
    if model.kind == "compact_base":
        return "domainclip/compact-base"
    if model.kind == "dual_encoder":
        return f"{model.vision}+{model.text}"
    return f"{model.name}{':' + model.pretrained if model.pretrained else ''}"


def _data_name(source: Any) -> str:
    return Path(source.path).parent.name if source.path else source.format


def run_metadata(run_dir: Path) -> dict[str, Any]:
    """Everything the card says, as data."""
    cfg = config_lib.load(RunConfig, run_dir / "config.yaml")
    model_info = json.loads((run_dir / "model" / "model.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = json.loads((run_dir / "train_summary.json").read_text())
    sources = [cfg.data.train, *cfg.data.train_extra]
    return {
        "base_model": base_model_id(cfg),
        "method": config_lib.to_dict(cfg.method),
        "input": {"modality": "image", "channels": len(model_info["backbone"]["preprocess"]["mean"]),
                  "value_range": [0, 255], "preprocess": model_info["backbone"]["preprocess"]},
        "classes": model_info.get("task", {}).get("class_names", []),
        "templates": model_info.get("task", {}).get("templates", []),
        "training_data": [{"name": _data_name(s), "format": s.format, "split": s.split, "shots": s.shots,
                           "class_subset": s.class_subset} for s in sources],
        "training": {k: summary.get(k) for k in ("global_step", "train_seconds", "trainable_parameters")},
        "evaluation": [{"dataset": m["dataset"], "task": m["task"],
                        "metrics": {k: v for k, v in m["metrics"].items() if isinstance(v, (int, float))},
                        **({"retention": m["retention"]} if "retention" in m else {})} for m in metrics],
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "config_hash": config_hash(cfg),
    }


def _model_index(name: str, meta: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for entry in meta["evaluation"]:
        values = entry["metrics"]
        keys = ("acc1", "mean_per_class_recall") if entry["task"] == "zeroshot_classification" else \
            ("mean_recall", "image_retrieval_recall@1", "text_retrieval_recall@1")
        results.append({
            "task": {"type": "zero-shot-image-classification" if "classification" in entry["task"] else "image-retrieval"},
            "dataset": {"name": entry["dataset"], "type": entry["dataset"]},
            "metrics": [{"type": k, "value": round(float(values[k]), 4)} for k in keys if k in values],
        })
    return [{"name": name, "results": results}]


def render_card(name: str, meta: dict[str, Any], domain_text: str = "", license_id: str = "other") -> str:
    header = {
        "license": license_id,
        "library_name": "domainclip",
        "base_model": meta["base_model"],
        "datasets": [d["name"] for d in meta["training_data"]],
        "tags": ["clip", "domainclip", meta["method"]["name"]],
        "pipeline_tag": "zero-shot-image-classification",
        "model-index": _model_index(name, meta),
    }
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", f"# {name}", ""]
    lines += [f"Adapted from `{meta['base_model']}` with the `{meta['method']['name']}` method of domainclip "
              f"({meta['training']['global_step']} steps, {meta['training']['trainable_parameters']:,} trained "
              f"parameters, {meta['training']['train_seconds']:.0f} s).", ""]
    if domain_text:
        lines += [domain_text.strip(), ""]
    lines += ["## Evaluation", "", "| data set | task | metrics | change from base |", "|---|---|---|---|"]
    for entry in meta["evaluation"]:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in entry["metrics"].items()
                          if k in ("acc1", "acc5", "mean_per_class_recall", "mean_recall"))
        change = entry.get("retention")
        delta = f"{change['metric']} {change['before']:.3f} → {change['after']:.3f}" if change else ""
        lines.append(f"| {entry['dataset']} | {entry['task']} | {shown} | {delta} |")
    lines += ["", "## Training data", ""]
    lines += [f"- {d['name']} ({d['format']}{', split ' + d['split'] if d['split'] else ''}"
              f"{', ' + str(d['shots']) + ' shots per class' if d['shots'] else ''})" for d in meta["training_data"]]
    if meta["classes"]:
        lines += ["", "## Classes and prompts", "", "Classes: " + ", ".join(meta["classes"]),
                  "", "Templates: " + "; ".join(f"`{t}`" for t in meta["templates"])]
    lines += ["", "## Input", "", f"{meta['input']['channels']} channels, values 0–255, preprocessing "
              f"`{json.dumps(meta['input']['preprocess'])}`.", "",
              f"Config hash `{meta['config_hash']}`; packages: " +
              ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v), ""]
    return "\n".join(lines)


def write_run_card(run_dir: str | Path, name: str = "", domain_text: str = "", license_id: str = "other") -> Path:
    """Write ``RUN/model/README.md`` and ``RUN/model/metadata.json``; returns the card's path."""
    run_dir = Path(run_dir)
    meta = run_metadata(run_dir)
    atomic_write_text(run_dir / "model" / "metadata.json", json.dumps(meta, indent=2) + "\n")
    card = run_dir / "model" / "README.md"
    atomic_write_text(card, render_card(name or run_dir.name, meta, domain_text, license_id))
    return card

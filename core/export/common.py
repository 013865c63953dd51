"""What every export format shares: reading a finished run, the merged backbone, the output folder.

A full-format export (open_clip, transformers, dual encoder) needs the run's model as a plain
backbone: a ``full`` run's model as trained, a ``lora`` run's model with its adapters merged into
the weights. Methods that add something outside the backbone (learned prompts, a projector, a
probe, a Tip-Adapter cache) cannot be expressed by those formats, so they are refused there and
exported with ``--format adapter`` instead.
"""
from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import config as config_lib
from ..backbones.base import Backbone
from ..cards import scrub
from ..checkpoint import atomic_write_text, require_safetensors, restore_folder
from ..methods import AdaptationMethod, build_method
from ..run_config import RunConfig
from ..train import load_trained

EXPORT_INFO_FILE = "domainclip_export.json"


def read_run(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """The resolved recipe and ``model/model.json`` of a finished run; a clear error otherwise."""
    run_dir = Path(run_dir)
    restore_folder(run_dir / "model")  # a kill while training swapped its final weights in
    for needed in (run_dir / "config.yaml", run_dir / "model" / "model.json", run_dir / "model" / "trainable.safetensors"):
        if not needed.is_file():
            raise FileNotFoundError(f"{run_dir} is not a finished run folder: {needed} is missing")
    require_safetensors(run_dir / "model" / "trainable.safetensors", "run weights")
    cfg = config_lib.load(RunConfig, run_dir / "config.yaml")
    return cfg, json.loads((run_dir / "model" / "model.json").read_text())


def full_backbone(run_dir: str | Path, cfg: RunConfig, fmt: str) -> Backbone:
    """The run's trained model as a plain backbone in eval mode (LoRA adapters merged)."""
    method = build_method(cfg.method)
    if method.plain_backbone.__func__ is AdaptationMethod.plain_backbone:  # type: ignore[attr-defined]
        raise ValueError(f"{run_dir} was trained with method {cfg.method.name!r}, which adds parts outside the backbone "
                         f"weights (prompts, heads or caches) that the {fmt!r} format cannot hold; export it with "
                         f"--format adapter")
    model, method, _ = load_trained(run_dir)
    return method.plain_backbone(model).eval()


def export_info(fmt: str, cfg: RunConfig, info: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The provenance record written beside every export: names and configs, passed through the
    card scrubber (a local weights path or an identifier-like run name becomes ``[redacted]``)."""
    record = {"format": fmt, "source_run": cfg.name, "method": cfg.method.name, "backbone": info.get("backbone", {}),
              **extra}
    return scrub(record, keep=("preprocess",))[0]


def require_new_folder(out: str | Path) -> Path:
    """``out`` resolved; ``FileExistsError`` when it exists and is not an empty folder (stale files of
    another export would be picked up by loaders that search a folder for weights)."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export folder {out} already exists and is not empty; choose a new folder or delete it")
    return out


def write_folder(out: str | Path, write: Callable[[Path], None], info: dict[str, Any]) -> Path:
    """Run ``write(tmp)`` into a fresh sibling folder, then move it to ``out`` (never half-written).

    ``out`` must not exist or be an empty folder: stale files of another export would be picked
    up by loaders that search a folder for weights.
    """
    out = require_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        write(tmp)
        atomic_write_text(tmp / EXPORT_INFO_FILE, json.dumps(info, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

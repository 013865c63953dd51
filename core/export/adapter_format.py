"""Adapter-only export, pinned to its base model.

The folder holds exactly what the run trained (``adapter.safetensors``, a copy of the run's
``model/trainable.safetensors``: peft LoRA/DoRA tensors, learned prompts of CoOp/CoCoOp/MaPLe,
a projector, a linear probe, a Tip-Adapter cache, or a full/locked run's trained weights) and a
manifest ``adapter.json`` that pins the base model: its kind, name, pretrained tag, revision and a
SHA-256 of its weights. :func:`load_adapter` rebuilds the adapted model on a base and refuses a base
whose weights hash differs, because adapters on another base silently compute something else.

The weights hash (``weights_sha256``) is taken over the base backbone's state dict as built by
``create_backbone`` (tensor names in sorted order, each with its dtype, shape and raw bytes), so
it does not depend on the file format the base was downloaded in.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import nn

from .. import config as config_lib
from ..backbones import Backbone, ModelConfig, create_backbone
from ..checkpoint import atomic_write_bytes, atomic_write_text
from ..features.cache import tensors_sha256
from ..methods import AdaptationMethod, TaskInfo
from ..run_config import RunConfig
from ..train import build_model

ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "adapter.json"
FORMAT = "domainclip-adapter"
FORMAT_VERSION = 1
WITHHELD = "[local path withheld]"  # what publish writes in place of a local path (core/publish.py)


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state dict: sorted names, dtypes, shapes and raw tensor bytes."""
    return tensors_sha256(sorted(model.state_dict().items()))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_model(model_cfg: ModelConfig, seed: int) -> Backbone:
    """The base backbone a run started from, seeded as training was (for randomly initialised parts)."""
    set_seed(seed)
    return create_backbone(model_cfg)


def base_identity(base: Backbone, model_cfg: ModelConfig) -> dict[str, Any]:
    """What pins an adapter to ``base``: kind, name, tag, revision, the resolved commit, weights hash."""
    config = base.config_dict()
    hf_config = getattr(getattr(base, "model", None), "config", None)
    return {"kind": model_cfg.kind, "name": config.get("name", model_cfg.name), "pretrained": model_cfg.pretrained,
            "revision": model_cfg.revision, "resolved_revision": getattr(hf_config, "_commit_hash", None) or "",
            "weights_sha256": weights_sha256(base), "model": config_lib.to_dict(model_cfg)}


def write_adapter(run_dir: Path, cfg: RunConfig, info: dict[str, Any], out: Path) -> None:
    """Copy the run's trained tensors into ``out`` and write the manifest pinned to the run's base."""
    source = run_dir / "model" / "trainable.safetensors"
    atomic_write_bytes(out / ADAPTER_FILE, source.read_bytes())
    tensors = load_file(str(out / ADAPTER_FILE))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": config_lib.to_dict(cfg.method),
        "task": info.get("task", {}),
        "seed": cfg.train.seed,
        "base": base_identity(base_model(cfg.model, cfg.train.seed), cfg.model),
        "adapter": {"file": ADAPTER_FILE, "sha256": file_sha256(out / ADAPTER_FILE), "tensors": len(tensors),
                    "parameters": int(sum(t.numel() for t in tensors.values()))},
        "preprocess": info.get("backbone", {}).get("preprocess", {}),
    }
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """``adapter.json`` of an adapter export, checked for format and version."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an adapter export: {path} is missing")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
                         f"expected {FORMAT!r} version {FORMAT_VERSION}")
    return manifest


def load_adapter(folder: str | Path, base: Backbone | None = None) -> tuple[Backbone, AdaptationMethod]:
    """The adapted model: ``base`` (default: built from the manifest) plus the exported adapter.

    ``base`` must be a freshly built backbone with exactly the weights the adapter was trained on
    (same SHA-256 as the manifest pins); any other base is refused with a ``ValueError``.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    pinned = manifest["base"]
    if base is None and WITHHELD in json.dumps(pinned["model"]):
        raise ValueError(f"{folder / MANIFEST_FILE}: the base model was a local file whose path was withheld when the "
                         f"adapter was published; build that base yourself and pass it: load_adapter(folder, "
                         f"base=create_backbone(ModelConfig(...))) (its weights hash is checked)")
    model_cfg = config_lib.from_dict(ModelConfig, pinned["model"], where="base.model", source=str(folder / MANIFEST_FILE))
    if base is None:
        base = base_model(model_cfg, int(manifest.get("seed", 0)))
    got = weights_sha256(base)
    if got != pinned["weights_sha256"]:
        given = base.config_dict()
        raise ValueError(
            f"{folder}: this adapter is pinned to base {pinned['kind']} {pinned['name']!r} (pretrained "
            f"{pinned['pretrained']!r}, revision {pinned['revision'] or pinned['resolved_revision'] or '-'!r}, weights "
            f"sha256 {pinned['weights_sha256'][:16]}...); the given base {given.get('kind')} {given.get('name')!r} has "
            f"weights sha256 {got[:16]}...: refusing to load the adapter onto a different base")
    adapter_file = folder / ADAPTER_FILE
    if file_sha256(adapter_file) != manifest["adapter"]["sha256"]:
        raise ValueError(f"{adapter_file}: its sha256 differs from the one in {MANIFEST_FILE}; the file was changed")
    cfg = config_lib.from_dict(RunConfig, {"model": pinned["model"], "method": manifest["method"]},
                               source=str(folder / MANIFEST_FILE))
    model, method = build_model(cfg, TaskInfo(**manifest.get("task", {})), base=base)
    method.load_trainable_state(model, load_file(str(adapter_file)), source=str(adapter_file))
    return model.eval(), method

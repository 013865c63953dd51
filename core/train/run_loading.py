"""Rebuild models from recipes and finished run folders: the one place that does it.

Training (``loop.py``), evaluation of a finished run, export, WiSE-FT, the zero-shot API and
teachers all go through :func:`build_model` and :func:`load_trained`, so a run comes back exactly as
it was trained (same base, same method, same seed for parts the method does not save).
"""
from __future__ import annotations

import json
from pathlib import Path

from accelerate.utils import set_seed
from safetensors.torch import load_file

from .. import config as config_lib
from ..backbones import Backbone, create_backbone
from ..checkpoint import require_safetensors
from ..methods import AdaptationMethod, TaskInfo, build_method
from ..run_config import RunConfig


def build_model(cfg: RunConfig, task: TaskInfo | None = None,
                base: Backbone | None = None) -> tuple[Backbone, AdaptationMethod]:
    """The backbone (``base`` or a new one) with the recipe's method applied for ``task``."""
    model = base if base is not None else create_backbone(cfg.model)
    method = build_method(cfg.method)
    model = method.apply(model, task or TaskInfo())
    return model, method


def load_trained(run_dir: str | Path) -> tuple[Backbone, AdaptationMethod, RunConfig]:
    """Rebuild a finished run's model: base weights + the method + its trained state."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder ({config_file} is missing)")
    cfg = config_lib.load(RunConfig, config_file)
    weights = run_dir / "model" / "trainable.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir} has no finished model ({weights} is missing); did training complete?")
    require_safetensors(weights, "run weights")
    info = json.loads((run_dir / "model" / "model.json").read_text())
    # seeded like training, so parts the method does not save (a random-init base) come back equal
    set_seed(cfg.train.seed)
    model, method = build_model(cfg, TaskInfo(**info.get("task", {})))
    method.load_trainable_state(model, load_file(str(weights)), source=str(weights))
    return model, method, cfg

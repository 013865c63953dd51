"""Rebuild models from recipes and finished run folders: the one place that does it.

Training (``loop.py``), evaluation of a finished run, export, WiSE-FT, the zero-shot API and
teachers all go through :func:`build_model` and :func:`load_trained`, so a run comes back exactly as
it was trained (same base, same method, same seed for parts the method does not save).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate.utils import set_seed
from safetensors.torch import load_file

from .. import config as config_lib
from ..backbones import Backbone, create_backbone
from ..checkpoint import require_safetensors, restore_folder
from ..methods import AdaptationMethod, TaskInfo, build_method
from ..methods.distill import set_run_loader
from ..run_config import RunConfig


def build_model(cfg: RunConfig, task: TaskInfo | None = None,
                base: Backbone | None = None) -> tuple[Backbone, AdaptationMethod]:
    """The backbone (``base`` or a new one) with the recipe's method applied for ``task``."""
    model = base if base is not None else create_backbone(cfg.model)
    method = build_method(cfg.method)
    model = method.apply(model, task or TaskInfo())
    return model, method


BASE_CHATTER = ("initialized randomly", "No pretrained weights loaded")


class _DropBaseChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in BASE_CHATTER)


@contextmanager
def quiet_base_loading() -> Iterator[None]:
    """Silence what building a base says when trained weights replace it right after: transformers'
    "Loading weights" bars and info, open_clip's "Model initialized randomly" (logged on the root
    logger). Errors still show; everything is restored on exit."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    drop = _DropBaseChatter()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_trained(run_dir: str | Path) -> tuple[Backbone, AdaptationMethod, RunConfig]:
    """Rebuild a finished run's model: base weights + the method + its trained state."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder ({config_file} is missing)")
    cfg = config_lib.load(RunConfig, config_file)
    restore_folder(run_dir / "model")  # a kill while training swapped its final weights in
    weights = run_dir / "model" / "trainable.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{run_dir} has no finished model ({weights} is missing); did training complete?")
    require_safetensors(weights, "run weights")
    info = json.loads((run_dir / "model" / "model.json").read_text())
    # seeded like training, so parts the method does not save (a random-init base) come back equal
    set_seed(cfg.train.seed)
    with quiet_base_loading():  # the trained state replaces what the messages are about
        model, method = build_model(cfg, TaskInfo(**info.get("task", {})))
    method.load_trainable_state(model, load_file(str(weights)), source=str(weights))
    return model, method, cfg


set_run_loader(lambda run_dir: load_trained(run_dir)[0])  # a finished run as a distillation teacher

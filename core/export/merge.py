"""``domainclip merge``: a finished LoRA run's adapters folded into a full backbone weights file."""
from __future__ import annotations

from pathlib import Path

from ..methods.lora import Lora, merged_backbone, save_merged
from ..methods.lora.method import MERGED_FILE
from ..train import load_trained


def merge_run(run_dir: str | Path, out_file: str | Path | None = None) -> Path:
    """Merge a finished LoRA run's adapters into its backbone; writes and returns a safetensors file.

    The file (default ``RUN/model/merged.safetensors``) is a full backbone state dict: set it as
    ``model.weights`` in a recipe with the run's ``model`` section to use the merged model.
    """
    model, method, cfg = load_trained(run_dir)
    if not isinstance(method, Lora):
        raise ValueError(f"{run_dir} was trained with method {cfg.method.name!r}; merge_run merges LoRA runs")
    out = Path(out_file) if out_file is not None else Path(run_dir) / "model" / MERGED_FILE
    return save_merged(merged_backbone(model, inplace=True), out, source=str(run_dir))

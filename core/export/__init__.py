"""Export a finished run to formats other tools load: open_clip, transformers, adapter-only, dual encoder.

``export_run(run_dir, fmt, out)`` writes one folder (see ``docs/export.md``):

- ``open_clip``: ``open_clip_config.json`` + ``open_clip_model.safetensors`` (runs on an open_clip
  backbone), for ``open_clip.create_model_and_transforms("local-dir:DIR")`` or ``hf-hub:`` ids;
- ``hf``: a transformers CLIPModel / SiglipModel folder with tokenizer and image processor (runs
  on an ``hf`` backbone), for ``transformers.pipeline("zero-shot-image-classification", model=DIR)``;
- ``dual_encoder``: the compact-base layout (runs on a ``dual_encoder`` / ``compact_base``
  backbone), for ``ModelConfig(kind="compact_base", name=DIR)``;
- ``adapter``: only the trained tensors plus a manifest pinned to the base's id, revision and
  weights hash (any run), for :func:`load_adapter`.

Full formats take ``full`` and ``lora`` runs (LoRA merged into the weights). Every export also
writes ``domainclip_export.json`` (format, source run name, method, backbone config).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

from ..backbones.base import Backbone
from .adapter_format import load_adapter, weights_sha256, write_adapter
from .common import KIND_FAMILY, export_info, full_backbone, read_run, require_new_folder, write_folder

EXPORT_FORMATS: tuple[str, ...] = ("open_clip", "hf", "adapter", "dual_encoder")
# backbone family -> the formats a run on it can export to
FORMATS_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "open_clip": ("open_clip", "adapter"),
    "hf": ("hf", "adapter"),
    "dual_encoder": ("dual_encoder", "adapter"),
}


def formats_for_kind(kind: str) -> tuple[str, ...]:
    """The export formats that fit a backbone ``kind`` (``adapter`` fits every kind)."""
    return FORMATS_BY_FAMILY.get(KIND_FAMILY.get(kind, ""), ("adapter",))


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> Path:
    """Export the finished run ``run_dir`` in format ``fmt`` into the new folder ``out``; returns ``out``."""
    if fmt not in EXPORT_FORMATS:
        close = difflib.get_close_matches(str(fmt), EXPORT_FORMATS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"export format {fmt!r} is not known{hint} (valid formats: {', '.join(EXPORT_FORMATS)})")
    require_new_folder(out)  # before the (possibly long) model rebuild
    run_dir = Path(run_dir)
    cfg, info = read_run(run_dir)
    kind = cfg.model.kind
    fitting = formats_for_kind(kind)
    if fmt not in fitting:
        raise ValueError(f"{run_dir} has a {kind!r} backbone, which exports as {' or '.join(fitting)}, not {fmt!r}"
                         f" (converting between backbone families is not supported)")
    if fmt == "adapter":
        return write_folder(out, lambda folder: write_adapter(run_dir, cfg, info, folder), export_info(fmt, cfg, info))
    writer = _full_writer(fmt, run_dir, full_backbone(run_dir, cfg, fmt))
    return write_folder(out, writer, export_info(fmt, cfg, info, lora_merged=cfg.method.name == "lora"))


def _full_writer(fmt: str, run_dir: Path, model: Backbone) -> Callable[[Path], None]:
    """The function that writes the plain (merged) backbone ``model`` of ``run_dir`` in format ``fmt``."""
    if fmt == "open_clip":
        from .open_clip_format import write_open_clip

        return lambda folder: write_open_clip(model, folder)
    if fmt == "hf":
        from .hf_format import write_hf

        return lambda folder: write_hf(model, folder)
    from safetensors import safe_open

    from .dual_encoder_format import trains_text_tower, write_dual_encoder

    with safe_open(str(run_dir / "model" / "trainable.safetensors"), framework="pt") as handle:
        text_trained = trains_text_tower(list(handle.keys()))
    return lambda folder: write_dual_encoder(model, folder, text_trained)


__all__ = ["EXPORT_FORMATS", "FORMATS_BY_FAMILY", "export_run", "formats_for_kind", "load_adapter", "weights_sha256"]

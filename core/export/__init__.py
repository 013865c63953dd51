"""Export a finished run to formats other tools load: open_clip, transformers, adapter-only, dual encoder.

``export_run(run_dir, fmt, out)`` writes one folder (see ``docs/export.md``):

- ``open_clip``: ``open_clip_config.json`` + ``open_clip_model.safetensors`` (runs on an open_clip
  backbone), for ``open_clip.create_model_and_transforms("local-dir:DIR")`` or ``hf-hub:`` ids;
- ``hf``: a transformers CLIPModel / SiglipModel / Siglip2Model folder with tokenizer and image
  processor (runs on an ``hf`` or ``siglip2`` backbone), for
  ``transformers.pipeline("zero-shot-image-classification", model=DIR)``;
- ``dual_encoder``: the compact-base layout (runs on a ``dual_encoder`` / ``compact_base``
  backbone), for ``ModelConfig(kind="compact_base", name=DIR)``;
- ``adapter``: only the trained tensors plus a manifest pinned to the base's id, revision and
  weights hash (any run), for :func:`load_adapter`.

Which full format fits a run is the backbone family's answer (``Backbone.export_formats``, the
family writes it: ``Backbone.write_export``); full formats take runs whose method trains a plain
backbone (``AdaptationMethod.plain_backbone``: full fine-tuning, LoRA merged into the weights). Every export also
writes ``domainclip_export.json`` (format, source run name, method, backbone config).
"""
from __future__ import annotations

import difflib
from pathlib import Path

from safetensors import safe_open

from ..backbones import BACKBONES, export_formats_for_kind
from .adapter_format import load_adapter, weights_sha256, write_adapter
from .common import export_info, full_backbone, read_run, require_new_folder, write_folder


def export_formats() -> tuple[str, ...]:
    """Every format some registered backbone family writes, plus ``adapter``."""
    return tuple(sorted({fmt for cls in BACKBONES.values() for fmt in cls.export_formats} | {"adapter"}))


def formats_for_kind(kind: str) -> tuple[str, ...]:
    """The export formats that fit a backbone ``kind`` (``adapter`` fits every kind)."""
    return export_formats_for_kind(kind)


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> Path:
    """Export the finished run ``run_dir`` in format ``fmt`` into the new folder ``out``; returns ``out``."""
    known = export_formats()
    if fmt not in known:
        close = difflib.get_close_matches(str(fmt), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"export format {fmt!r} is not known{hint} (valid formats: {', '.join(known)})")
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
    model = full_backbone(run_dir, cfg, fmt)
    with safe_open(str(run_dir / "model" / "trainable.safetensors"), framework="pt") as handle:
        trained = list(handle.keys())
    return write_folder(out, lambda folder: model.write_export(fmt, folder, trained),
                        export_info(fmt, cfg, info, lora_merged=cfg.method.name == "lora"))


__all__ = ["export_formats", "export_run", "formats_for_kind", "load_adapter", "weights_sha256"]

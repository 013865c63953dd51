"""Named presets of the Karpathy-JSON caption data sets, registered as data formats.

Each preset is the core ``karpathy`` reader (``core/data/sources.py``) with the data set's own
defaults filled in; nothing is re-implemented. For a preset ``rsicd`` two formats exist:

* ``format: rsicd`` -- captions (image-text training and retrieval); ``path`` may be the data
  set's folder (the JSON file is then found inside) or the JSON file itself.
* ``format: rsicd_scenes`` -- scene classification from the file-name prefix
  (``airport_348.jpg`` -> ``airport``; ``label_key: "@filename_prefix"``). Images whose name
  carries no class (RSICD has 921 purely numeric names) are **left out** and listed in
  ``RecordSet.skipped`` with the reason, never given a guessed label. Class names are
  normalised (``denseresidential`` -> "dense residential area") unless ``class_names`` is given.
  Only presets whose file names carry the scene class have this form.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from domainclip.core.data.records import RecordSet
from domainclip.core.data.sources import FILENAME_PREFIX, DataSourceConfig, load_karpathy, register_format

from ..prompts import OVERHEAD_TEMPLATES, normalise_class_name

NO_SCENE_CLASS = "no scene class in the file name (left out of classification)"


@dataclass(frozen=True)
class CaptionPreset:
    """Where a Karpathy-layout caption data set keeps its files.

    Attributes:
        name: format name (``rsicd``); ``<name>_scenes`` is registered when ``scene_labels``.
        json_names: candidate caption JSON file names inside the data set folder (first found wins).
        image_dirs: candidate image folders inside the data set folder (first existing wins;
            none existing = the core reader's own search).
        scene_labels: the file names carry the scene class as a prefix (``airport_1.jpg``).
        class_names: curated raw -> natural class names (else :func:`normalise_class_name`).
        source: where users obtain the data (shown when it is missing; never downloaded here).
    """

    name: str
    json_names: tuple[str, ...]
    image_dirs: tuple[str, ...]
    scene_labels: bool = False
    class_names: dict[str, str] = field(default_factory=dict)
    source: str = ""


PRESETS: dict[str, CaptionPreset] = {}


def find_json(preset: CaptionPreset, path: str) -> tuple[Path, Path | None]:
    """``(caption JSON, data set folder or None)`` for a folder or a JSON path."""
    given = Path(path).expanduser()
    if given.is_dir():
        for candidate in preset.json_names:
            if (given / candidate).is_file():
                return given / candidate, given
        raise FileNotFoundError(
            f"{preset.name}: none of {list(preset.json_names)} found in '{given}' (config key 'path'); "
            f"get the data from {preset.source or 'its authors'} and point 'path' at its folder or JSON file")
    if not given.is_file():
        raise FileNotFoundError(f"{preset.name}: data path not found: '{given}' (config key 'path'); "
                                f"source: {preset.source or 'its authors'}")
    return given, given.parent


def resolve_source(preset: CaptionPreset, cfg: DataSourceConfig, scenes: bool) -> DataSourceConfig:
    """The plain ``karpathy`` source equivalent to ``cfg`` under ``preset``'s defaults."""
    manifest, folder = find_json(preset, cfg.path)
    changes: dict[str, object] = {"format": "karpathy", "path": str(manifest)}
    if not cfg.image_root and folder is not None:
        found = next((folder / d for d in preset.image_dirs if (folder / d).is_dir()), None)
        if found is not None:
            changes["image_root"] = str(found)
    if scenes:
        changes["label_key"] = cfg.label_key or FILENAME_PREFIX
        if not cfg.class_names and preset.class_names:
            changes["class_names"] = dict(preset.class_names)
    return dataclasses.replace(cfg, **changes)


def load_preset(preset: CaptionPreset, cfg: DataSourceConfig, scenes: bool) -> RecordSet:
    """Records of ``cfg`` read through the core Karpathy reader with ``preset``'s defaults.

    ``load_records`` applies ``holdout``, ``class_subset``, ``shots`` and ``limit`` afterwards,
    so for scenes they act on the labelled images only.
    """
    source = resolve_source(preset, cfg, scenes)
    record_set = load_karpathy(source)
    if not scenes:
        return record_set
    kept = [r for r in record_set.records if r.label >= 0]
    skipped = [*record_set.skipped, *((r.image, NO_SCENE_CLASS) for r in record_set.records if r.label < 0)]
    names = record_set.class_names if source.class_names else \
        [normalise_class_name(raw) for raw in record_set.raw_class_names]
    return RecordSet(kept, names, record_set.raw_class_names, skipped)


def register_preset(preset: CaptionPreset) -> CaptionPreset:
    """Register ``preset`` as the data formats ``<name>`` (and ``<name>_scenes``)."""
    PRESETS[preset.name] = preset
    register_format(preset.name)(lambda cfg: load_preset(preset, cfg, scenes=False))
    if preset.scene_labels:
        register_format(f"{preset.name}_scenes")(lambda cfg: load_preset(preset, cfg, scenes=True))
    return preset


def preset_source(name: str, path: str, split: str = "", scenes: bool = False, **options: object) -> DataSourceConfig:
    """A ``DataSourceConfig`` for a registered preset (``preset_source("rsicd", root, "test", True)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown caption data set {name!r}; registered: {sorted(PRESETS)}")
    if scenes and not PRESETS[name].scene_labels:
        raise ValueError(f"{name}: file names carry no scene class, so there is no {name}_scenes format")
    fmt = f"{name}_scenes" if scenes else name
    defaults = {"templates": list(OVERHEAD_TEMPLATES)} if scenes else {}
    return DataSourceConfig(format=fmt, path=str(path), split=split, **{**defaults, **options})

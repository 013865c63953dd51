"""Scene classification from class folders and label CSVs, with overhead class names and prompts.

``format: scene_folders`` (``root/<class>/*.jpg``) and ``format: scene_label_csv`` (``path,label``)
are the core ``folders`` / ``label_csv`` readers with two remote-sensing defaults: class names are
normalised (``denseresidential`` -> "dense residential area") unless ``class_names`` maps them,
and the captions made from class names use :data:`OVERHEAD_TEMPLATES` unless ``templates`` is set.
RSICD / RSITMD file-name prefixes are the ``rsicd_scenes`` / ``rsitmd_scenes`` formats (presets.py).
"""
from __future__ import annotations

import dataclasses

from domainclip.core.cards import register_data_layout
from domainclip.core.data.records import RecordSet
from domainclip.core.data.sources import DataSourceConfig, FORMAT_LOADERS, register_format

from ..prompts import OVERHEAD_TEMPLATES, class_name_map

CORE_DEFAULT_TEMPLATES = DataSourceConfig().templates


def load_scenes(cfg: DataSourceConfig, core_format: str) -> RecordSet:
    """Read ``cfg`` with the core reader ``core_format``, then again with normalised names."""
    loader = FORMAT_LOADERS[core_format]
    base = dataclasses.replace(cfg, format=core_format)
    if base.templates == CORE_DEFAULT_TEMPLATES:
        base = dataclasses.replace(base, templates=list(OVERHEAD_TEMPLATES))
    first = loader(base)  # manifests only; images are never opened here
    names = {**class_name_map(first.raw_class_names), **cfg.class_names}
    return loader(dataclasses.replace(base, class_names=names))


@register_format("scene_folders")
def load_scene_folders(cfg: DataSourceConfig) -> RecordSet:
    """``root/<class>/<images>`` with normalised class names and overhead prompts."""
    return load_scenes(cfg, "folders")


@register_format("scene_label_csv")
def load_scene_label_csv(cfg: DataSourceConfig) -> RecordSet:
    """``path,label`` CSV with normalised class names and overhead prompts."""
    return load_scenes(cfg, "label_csv")


register_data_layout("scene_folders", "scene_label_csv")  # the user's own files, not a named data set

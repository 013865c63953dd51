"""CT volumes as records of axial slices rendered to cached PNG, with organ captions and labels.

A manifest CSV lists volumes, one per row: ``image`` (NIfTI file or DICOM series folder; the
column is ``image_key``), optional ``label_map`` (organ label map on the same grid),
``label_names`` (JSON ``{id: name}``, TotalSegmentator's ``labels_total.json`` layout; required
with a ``label_map``, and every organ id captioned must have a name: a missing column, an empty
cell or an unnamed id is an error naming the manifest line), ``split`` and ``slices``
(``start:stop``, a block of axial indices within the volume, else an error: one volume can give a
train block and a test block of contiguous slices, which leak less than a random slice split).
Relative paths start at the manifest's folder (or ``image_root``).

Every record carries a group id for volume-level evaluation (``eval[].groups``): ``row<line>``,
the manifest line its slices come from (a whole volume, or a block of one: a pseudo-volume), or
the value of the ``group_key`` column when the config names one (rows with the same value are
one group). Never the volume's path, which may hold a patient ID.

Every axial slice (every ``stride``-th) becomes one record whose image is a PNG in the medical
cache (three HU windows as channels, or a 2.5D slab) and whose captions name the organs in the
slice (:func:`ct.organ_caption`). With ``label_key: <organ>`` the slice's label is the presence of
that organ (``min_voxels`` voxels or more): raw classes ``absent`` / ``present``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domainclip.core.data.records import ImageTextRecord, RecordSet, build_class_index
from domainclip.core.data.sources import DataSourceConfig, existing_path, image_root_for, read_csv_rows, wanted_splits

from .ct import (DEFAULT_WINDOWS, axial_slice, load_volume, organ_caption, readable_organ, sample_slices, slab_25d,
                 window_channels)
from .pixel_cache import cached_paths, load_sidecar, save_rendering
from .privacy import safe_item
from .prompts import CT_TEMPLATES

CORE_DEFAULT_TEMPLATES = DataSourceConfig().templates


@dataclass(frozen=True)
class SliceOptions:
    """How slices are rendered: HU windows as channels, or a 2.5D slab of ``neighbours``."""

    windows: tuple[str, ...] = DEFAULT_WINDOWS
    slab_window: str = ""  # non-empty: 2.5D in this window instead of stacked windows
    neighbours: int = 1
    stride: int = 1
    min_voxels: int = 10


def read_label_names(path: str | os.PathLike[str]) -> dict[int, str]:
    """``{id: organ}`` from a JSON object (``{"1": "spleen", ...}``)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read organ label names '{path}': {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"organ label names '{path}' must be a JSON object {{id: name}}")
    return {int(key): str(value) for key, value in data.items()}


def render_slice(volume_path: str, hu: np.ndarray | None, z: int, options: SliceOptions) -> Path:
    """Cached PNG of slice ``z`` (``hu`` is loaded lazily by the caller only when needed)."""
    key = (z, options.windows, options.slab_window, options.neighbours)
    png, sidecar = cached_paths("ct", volume_path, *key)
    if load_sidecar(png, sidecar) is None:
        if hu is None:
            raise LookupError("volume needed")
        pixels = (slab_25d(hu, z, options.slab_window, options.neighbours) if options.slab_window
                  else window_channels(axial_slice(hu, z), options.windows))
        if pixels.shape[0] != 3:
            raise ValueError(f"slices need 3 channels for RGB models, got {pixels.shape[0]} "
                             f"(windows={options.windows}, neighbours={options.neighbours})")
        save_rendering(pixels, {"slice": z, "windows": list(options.windows)}, png, sidecar)
    return png


def parse_block(text: str, where: str) -> tuple[int, int] | None:
    """``"start:stop"`` -> (start, stop); ``""`` -> None."""
    if not text.strip():
        return None
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"{where}: slices {text!r} must be 'start:stop' (axial indices)") from None
    if not 0 <= start < stop:
        raise ValueError(f"{where}: slices {text!r} must satisfy 0 <= start < stop")
    return start, stop


def volume_slices(volume_path: str, options: SliceOptions, block: tuple[int, int] | None = None) -> list[tuple[int, Path]]:
    """``(z, cached PNG)`` of every sampled slice of one volume (within ``block``); the volume is
    read only when a slice is not cached yet. A ``block`` reaching past the volume's last slice is
    a ``ValueError`` (naming the volume by pseudonym, the block and the slice count), never a
    silently shorter block."""
    hu = None
    depth_png = cached_paths("ct_depth", volume_path)[1]
    if depth_png.is_file():
        depth = int(json.loads(depth_png.read_text())["depth"])
    else:
        hu = load_volume(volume_path).array
        depth = hu.shape[2]
        depth_png.parent.mkdir(parents=True, exist_ok=True)
        depth_png.write_text(json.dumps({"depth": depth}))
    if block and block[1] > depth:
        raise ValueError(f"slices {block[0]}:{block[1]} reach past the end of {safe_item(volume_path, 'volume')}, "
                         f"which has {depth} axial slices (valid blocks lie within 0:{depth})")
    paths = []
    for z in sample_slices(depth, options.stride):
        if block and not block[0] <= z < block[1]:
            continue
        try:
            paths.append((z, render_slice(volume_path, hu, z, options)))
        except LookupError:
            hu = load_volume(volume_path).array
            paths.append((z, render_slice(volume_path, hu, z, options)))
    return paths


def load_ct_slices(cfg: DataSourceConfig, options: SliceOptions = SliceOptions()) -> RecordSet:
    """Records of every sampled axial slice of every volume in the manifest (module docstring)."""
    manifest = existing_path(cfg)
    root = image_root_for(cfg, manifest)
    rows, names, columns = read_csv_rows(manifest)
    image_key = cfg.image_key if cfg.image_key in columns else "image"
    if image_key not in columns:
        raise KeyError(f"column {cfg.image_key!r} (config key 'image_key') not found in {manifest}; columns: {columns}")
    if cfg.group_key and cfg.group_key not in columns:
        raise KeyError(f"column {cfg.group_key!r} (config key 'group_key') not found in {manifest}; columns: {columns}")
    splits = wanted_splits(cfg.split)
    if splits and "split" not in columns:
        raise KeyError(f"split {cfg.split!r} asked for but {manifest} has no 'split' column")
    templates = cfg.templates if cfg.templates != CORE_DEFAULT_TEMPLATES else CT_TEMPLATES
    organ = cfg.label_key
    raw_names = ["absent", "present"] if organ else []
    defaults = {"absent": f"no {readable_organ(organ)}", "present": f"the {readable_organ(organ)}"} if organ else {}
    index, class_names, raw_names = build_class_index(raw_names, {**defaults, **cfg.class_names}) if organ else ({}, [], [])
    records: list[ImageTextRecord] = []
    skipped: list[tuple[str, str]] = []
    for row, name in zip(rows, names):
        if splits and row.get("split", "").strip() not in splits:
            continue
        volume_path = os.path.join(root, row[image_key].strip())
        group = row[cfg.group_key].strip() if cfg.group_key else f"row{name.rsplit(':', 1)[1]}"
        label_path = row.get("label_map", "").strip()
        if organ and not label_path:
            raise ValueError(f"{name}: label_key {organ!r} needs a 'label_map' column value")
        if label_path and "label_names" not in columns:
            raise KeyError(f"{name}: a 'label_map' needs a 'label_names' column (JSON {{id: organ}}, e.g. "
                           f"TotalSegmentator's labels_total.json) to name the organs; columns: {columns}")
        if label_path and not row["label_names"].strip():
            raise ValueError(f"{name}: 'label_names' is empty; a 'label_map' needs its organ names "
                             f"(JSON {{id: organ}}, e.g. TotalSegmentator's labels_total.json)")
        try:
            pngs = volume_slices(volume_path, options, parse_block(row.get("slices", ""), name))
            labels = load_volume(os.path.join(root, label_path), labels=True).array if label_path else None
        except (OSError, ValueError) as error:
            raise type(error)(f"{name}: {error}") from None
        if labels is None:
            records += [ImageTextRecord(str(p), ["an axial CT slice."], group=group) for _, p in pngs]
            continue
        label_names = read_label_names(os.path.join(root, row["label_names"].strip()))
        if organ and organ not in label_names.values():
            raise ValueError(f"{name}: organ {organ!r} (config key 'label_key') is not in the label names")
        last = pngs[-1][0] if pngs else -1
        if labels.shape[2] <= last:
            raise ValueError(f"{name}: label map has {labels.shape[2]} axial slices, the volume at least {last + 1}")
        for z, png in pngs:
            plane = axial_slice(labels, z)
            ids, counts = np.unique(plane, return_counts=True)
            kept = [int(i) for i, c in sorted(zip(ids, counts), key=lambda p: -p[1])
                    if int(i) != 0 and c >= options.min_voxels]
            unnamed = sorted(i for i in kept if i not in label_names)
            if unnamed:
                raise ValueError(f"{name}: label id(s) {unnamed} of the label map (axial slice {z}) have no name in "
                                 f"its 'label_names' file")
            by_size = [label_names[i] for i in kept]
            captions = [organ_caption(by_size, t) for t in templates]
            label = index["present" if organ in by_size else "absent"] if organ else -1
            records.append(ImageTextRecord(str(png), captions, label, group))
    if not records:
        raise ValueError(f"{manifest}: no slices (split {cfg.split!r})")
    return RecordSet(records, class_names, raw_names, skipped)


__all__ = ["SliceOptions", "load_ct_slices", "parse_block", "read_label_names", "volume_slices"]

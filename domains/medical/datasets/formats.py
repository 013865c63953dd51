"""Data formats of the medical domain, registered with core on import (``format:`` in recipes).

* ``cxr_dicom`` -- a CSV manifest (core ``csv`` columns: ``image_key``, ``caption_key``,
  ``label_key``...) whose images may be DICOM files; they are rendered to the medical cache
  (``cxr.dicom_records``). ``cxr_dicom_frontal`` keeps PA and AP views, ``cxr_dicom_pa``,
  ``cxr_dicom_ap``, ``cxr_dicom_lateral`` one view.
* ``chexpert`` (U-Ones), ``chexpert_zeros`` (U-Zeros), ``chexpert_ignore`` (U-Ignore) -- a
  CheXpert / MIMIC-CXR label CSV: ``image_key`` (default ``Path``) and the finding columns.
  Captions list the positive findings through ``templates`` (default :data:`CXR_TEMPLATES`). With
  ``label_key: <finding column>`` each record's label is that finding (raw classes ``0`` / ``1``,
  named "no <finding>" / "<finding>"); rows whose target is unknown under the policy are skipped.
* ``iu_reports`` -- IU X-ray ``reports.csv``: captions are the cleaned IMPRESSION and FINDINGS
  (XXXX sentences dropped); image column ``image_path``.
* ``ct_slices`` / ``ct_slices_25d`` -- see ``ct_records.py``.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from domainclip.core.cards import register_data_layout
from domainclip.core.data.records import ImageTextRecord, RecordSet, build_class_index
from domainclip.core.data.sources import (
    FORMAT_LOADERS,
    DataSourceConfig,
    existing_path,
    image_root_for,
    register_format,
    wanted_splits,
)

from ..ct_records import SliceOptions, load_ct_slices
from ..cxr import dicom_records
from ..labels import read_label_csv
from ..prompts import CXR_TEMPLATES, finding_phrase, findings_caption
from ..reports import read_iu_reports

CORE_DEFAULT_TEMPLATES = DataSourceConfig().templates
VIEW_FORMATS = {"cxr_dicom": (), "cxr_dicom_frontal": ("PA", "AP"), "cxr_dicom_pa": ("PA",),
                "cxr_dicom_ap": ("AP",), "cxr_dicom_lateral": ("LATERAL",)}
UNCERTAINTY_FORMATS = {"chexpert": "ones", "chexpert_zeros": "zeros", "chexpert_ignore": "ignore"}


def cxr_templates(cfg: DataSourceConfig) -> list[str]:
    return list(CXR_TEMPLATES) if cfg.templates == CORE_DEFAULT_TEMPLATES else list(cfg.templates)


def _register_view_format(name: str, views: tuple[str, ...]) -> None:
    @register_format(name)
    def load(cfg: DataSourceConfig) -> RecordSet:
        base = dataclasses.replace(cfg, format="csv")
        return dicom_records(FORMAT_LOADERS["csv"](base), views)


def load_chexpert(cfg: DataSourceConfig, uncertain: str) -> RecordSet:
    """Records of a CheXpert-layout label CSV (see the module docstring)."""
    manifest = existing_path(cfg)
    table = read_label_csv(manifest, uncertain=uncertain, image_key=cfg.image_key if cfg.image_key != "image" else "Path")
    root = image_root_for(cfg, manifest)
    templates = cxr_templates(cfg)
    if cfg.label_key and cfg.label_key not in table.findings:
        raise KeyError(f"label_key {cfg.label_key!r} is not a finding column of {manifest}; columns: {table.findings}")
    target_column = table.findings.index(cfg.label_key) if cfg.label_key else -1
    mapping = {"0": f"no {finding_phrase(cfg.label_key)}", "1": finding_phrase(cfg.label_key), **cfg.class_names} \
        if cfg.label_key else {}
    index, class_names, raw_names = build_class_index(["0", "1"], mapping) if cfg.label_key else ({}, [], [])
    splits = wanted_splits(cfg.split)
    if splits and not all("split" in row for row in table.rows[:1]):
        raise KeyError(f"split {cfg.split!r} asked for but {manifest} has no 'split' column")
    records, skipped = [], []
    for position, (image, targets, row) in enumerate(zip(table.images, table.targets, table.rows)):
        if splits and row.get("split", "").strip() not in splits:
            continue
        label = -1
        if cfg.label_key:
            value = targets[target_column]
            if np.isnan(value):
                skipped.append((f"{manifest}:{position + 2}", f"{cfg.label_key} unknown under policy {uncertain!r}"))
                continue
            label = index[str(int(value))]
        positives = [f for f, t in zip(table.findings, targets) if t == 1.0]
        captions = [findings_caption(positives, t) for t in templates]
        records.append(ImageTextRecord(os.path.join(root, image.strip()), captions, label))
    return dicom_records(RecordSet(records, class_names, raw_names, skipped))


def _register_chexpert_format(name: str, uncertain: str) -> None:
    @register_format(name)
    def load(cfg: DataSourceConfig) -> RecordSet:
        return load_chexpert(cfg, uncertain)


@register_format("iu_reports")
def load_iu_reports(cfg: DataSourceConfig) -> RecordSet:
    """IU X-ray ``reports.csv``: image ``image_path``, captions IMPRESSION then FINDINGS (cleaned)."""
    manifest = existing_path(cfg)
    root = image_root_for(cfg, manifest)
    image_key = cfg.image_key if cfg.image_key != "image" else "image_path"
    records, skipped = [], []
    for position, (row, report) in enumerate(read_iu_reports(manifest)):
        where = f"{manifest}:{position + 2}"
        if image_key not in row:
            raise KeyError(f"column {image_key!r} (config key 'image_key') not found in {manifest}")
        captions = report.captions()
        if not captions:
            skipped.append((where, "no findings or impression left after removing de-identification marks"))
            continue
        records.append(ImageTextRecord(os.path.join(root, row[image_key].strip()), captions))
    return dicom_records(RecordSet(records, [], [], skipped))


@register_format("ct_slices")
def load_ct_slice_records(cfg: DataSourceConfig) -> RecordSet:
    """Axial slices, lung / mediastinum / bone windows as the channels."""
    return load_ct_slices(cfg, SliceOptions())


@register_format("ct_slices_25d")
def load_ct_slab_records(cfg: DataSourceConfig) -> RecordSet:
    """Axial slices as 2.5D slabs: the slice and its two neighbours, abdomen window."""
    return load_ct_slices(cfg, SliceOptions(slab_window="abdomen", neighbours=1))


for _name, _views in VIEW_FORMATS.items():
    _register_view_format(_name, _views)
for _name, _policy in UNCERTAINTY_FORMATS.items():
    _register_chexpert_format(_name, _policy)
register_data_layout(*VIEW_FORMATS, "ct_slices", "ct_slices_25d")  # the user's own files, not named data sets

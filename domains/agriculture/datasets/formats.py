"""PlantVillage-layout leaf-disease data as kit data formats, labelled by full class, crop or disease.

Three formats read the same data and differ only in what the label is:

* ``format: plantvillage`` -- the raw class (``Apple___Cedar_apple_rust``), named
  "an apple leaf with cedar apple rust";
* ``format: plantvillage_crop`` -- the crop ("an apple leaf"); every disease of a crop is one class;
* ``format: plantvillage_disease`` -- the disease ("a leaf with black rot", "a healthy leaf");
  one disease on several crops is one class.

(The data-source schema is shared by every format, so the attribute is part of the format name
rather than an extra key.) ``path`` may be:

* a folder holding ``<split>.csv`` manifests (``path,label`` rows, the layout of
  ``shared/data/agriculture/plantvillage_apple``) -- ``split: train`` reads ``train.csv``;
* a folder of class folders (``<root>/<Crop>___<Disease>/*.jpg``, the original PlantVillage
  release), or one holding ``images/<class>/`` when no split is asked; ``split: train`` with
  ``<root>/train/<class>/`` folders reads those;
* a ``path,label`` CSV file.

Images are never opened here. Captions are ``templates`` (default :data:`LEAF_TEMPLATES`) on the
class phrase; ``class_names`` overrides phrases by class key (raw name for ``plantvillage``, the
crop or disease words for the others).

Class numbers are the same in every split: the classes are those of **every** split file of the
data set (every ``*.csv`` beside ``<split>.csv`` that has the label column, or every sibling
``<root>/<other split>/`` folder of class folders), plus every ``class_names`` key (as core's
``label_csv`` does), so a split that lacks a class still numbers the others like the other splits.
A ``class_names`` key found in no file of the data set is kept as a class and logged as a warning.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from domainclip.core.data.records import RecordSet, build_class_index, captions_from_templates, natural_class_name
from domainclip.core.data.sources import (FORMAT_LOADERS, DataSourceConfig, lookup, raw_label, read_csv_rows,
                                          register_format)

from ..prompts import LEAF_TEMPLATES, SEPARATOR, LeafClass, class_phrases, parse_class_name

log = logging.getLogger("domainclip.domains.agriculture")

CORE_DEFAULT_TEMPLATES = DataSourceConfig().templates


def dataset_class_names(cfg: DataSourceConfig) -> list[str]:
    """Raw class names of every split file of ``cfg``'s data set, so that all splits number classes alike.

    With ``split`` set: the labels of every ``*.csv`` in the folder of ``<split>.csv`` that has the
    label column (``label_key``, default ``label``), or the class folders of every sibling folder of
    ``<root>/<split>/`` whose sub-folders are all ``<Crop>___<Disease>`` classes. Empty for the
    layouts that are one set (no split, a single CSV file).
    """
    path = Path(cfg.path).expanduser()
    if not cfg.split or not path.is_dir():
        return []
    names: set[str] = set()
    if (path / f"{cfg.split}.csv").is_file():
        label_key = cfg.label_key or "label"
        for manifest in sorted(path.glob("*.csv")):
            rows, _, columns = read_csv_rows(manifest)
            if label_key in columns:  # a split manifest (other CSVs are not data of this set)
                names.update(raw_label(lookup(row, label_key)) for row in rows)
    elif (path / cfg.split).is_dir():
        for folder in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
            classes = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
            if folder.name == cfg.split or (classes and all(SEPARATOR in name for name in classes)):
                names.update(classes)
    names.discard("")
    return sorted(names)


def core_source(cfg: DataSourceConfig) -> DataSourceConfig:
    """The core ``label_csv`` / ``folders`` source that reads ``cfg``'s files (see the module docstring).

    Its ``class_names`` lists the classes of every split file (:func:`dataset_class_names`), so the
    core loader numbers the classes of every split alike.
    """
    path = Path(cfg.path).expanduser()
    templates = list(LEAF_TEMPLATES) if cfg.templates == CORE_DEFAULT_TEMPLATES else list(cfg.templates)
    every_class = {raw: natural_class_name(raw) for raw in dataset_class_names(cfg)}
    base = dataclasses.replace(cfg, templates=templates, class_names=every_class)
    if path.is_dir():
        if cfg.split and (path / f"{cfg.split}.csv").is_file():
            return dataclasses.replace(base, format="label_csv", path=str(path / f"{cfg.split}.csv"), split="")
        if not cfg.split and (path / "images").is_dir() and not (path / "train").is_dir():
            return dataclasses.replace(base, format="folders", path=str(path / "images"))
        if cfg.split and not (path / cfg.split).is_dir():
            raise FileNotFoundError(f"{cfg.format}: split {cfg.split!r} (config key 'split') has neither "
                                    f"'{path / (cfg.split + '.csv')}' nor a folder '{path / cfg.split}'")
        return dataclasses.replace(base, format="folders")
    if cfg.split:
        raise ValueError(f"{cfg.format}: split {cfg.split!r} was given but path '{path}' is one CSV file; "
                         "point path at the folder holding <split>.csv or leave split empty")
    return dataclasses.replace(base, format="label_csv")


def leaf_classes(record_set: RecordSet) -> list[LeafClass]:
    """The parsed class of every label of a full-class record set (index = label)."""
    return [parse_class_name(raw) for raw in record_set.raw_class_names]


def relabel(record_set: RecordSet, attribute: str, templates: list[str],
            overrides: dict[str, str] | None = None) -> RecordSet:
    """Records of a full-class set labelled by ``attribute`` (full / crop / disease), captions rebuilt.

    Every key of ``overrides`` (``class_names``) is a class, also one this data lacks (as in core's
    ``label_csv``), so splits number their classes alike; such a key is logged as a warning. For
    ``full`` a key must be a ``<Crop>___<Disease>`` name; for crop / disease it must not be one.
    """
    parsed = leaf_classes(record_set)
    phrases = class_phrases(record_set.raw_class_names, attribute)
    extra = sorted(set(overrides or {}) - set(phrases))
    if attribute == "full":
        for key in extra:
            try:
                phrases[key] = parse_class_name(key).phrase(attribute)
            except ValueError as error:
                raise ValueError(f"class_names key {key!r}: {error}") from error
    else:
        full_names = [key for key in extra if SEPARATOR in key]
        if full_names:
            raise ValueError(f"class_names keys {full_names} are full class names, but {attribute} classes are "
                             f"keyed by {attribute} words (e.g. {sorted(phrases)}); use format 'plantvillage' "
                             f"for full class names")
    if extra:
        log.warning("class_names keys %s are not %s classes of this data (in no split file); kept as classes "
                    "of their own (check for a typo)", extra, attribute)
    index, names, keys = build_class_index(phrases, {**phrases, **(overrides or {})})
    captions = {key: captions_from_templates(name, templates) for key, name in zip(keys, names)}
    records = []
    for record in record_set.records:
        if record.label < 0:
            records.append(record)
            continue
        key = parsed[record.label].key(attribute)
        records.append(dataclasses.replace(record, captions=list(captions[key]), label=index[key]))
    return RecordSet(records, names, keys, list(record_set.skipped))


def load_leaf_records(cfg: DataSourceConfig, attribute: str) -> RecordSet:
    """Read ``cfg`` (PlantVillage layout) labelled by ``attribute`` (full, crop or disease)."""
    source = core_source(cfg)
    loader = FORMAT_LOADERS[source.format]
    # one read; class names (and their template captions) are set afterwards, and an unknown
    # class_names key is an error in every mode (for "full" the keys are the raw class names)
    return relabel(loader(source), attribute, source.templates, cfg.class_names)


@register_format("plantvillage")
def load_plantvillage(cfg: DataSourceConfig) -> RecordSet:
    """Leaf-disease classes ``<Crop>___<Disease>`` as natural phrases (label = the full class)."""
    return load_leaf_records(cfg, "full")


@register_format("plantvillage_crop")
def load_plantvillage_crop(cfg: DataSourceConfig) -> RecordSet:
    """The same data labelled by crop."""
    return load_leaf_records(cfg, "crop")


@register_format("plantvillage_disease")
def load_plantvillage_disease(cfg: DataSourceConfig) -> RecordSet:
    """The same data labelled by disease (healthy is one class)."""
    return load_leaf_records(cfg, "disease")

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
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from domainclip.core.data.records import ImageTextRecord, RecordSet, build_class_index, captions_from_templates
from domainclip.core.data.sources import FORMAT_LOADERS, DataSourceConfig, register_format

from ..prompts import LEAF_TEMPLATES, LeafClass, class_phrases, parse_class_name

CORE_DEFAULT_TEMPLATES = DataSourceConfig().templates


def core_source(cfg: DataSourceConfig) -> DataSourceConfig:
    """The core ``label_csv`` / ``folders`` source that reads ``cfg``'s files (see the module docstring)."""
    path = Path(cfg.path).expanduser()
    templates = list(LEAF_TEMPLATES) if cfg.templates == CORE_DEFAULT_TEMPLATES else list(cfg.templates)
    base = dataclasses.replace(cfg, templates=templates, class_names={})
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
    """Records of a full-class set labelled by ``attribute`` (full / crop / disease), captions rebuilt."""
    parsed = leaf_classes(record_set)
    phrases = class_phrases(record_set.raw_class_names, attribute)
    unknown = sorted(set(overrides or {}) - set(phrases))
    if unknown:
        raise ValueError(f"class_names keys {unknown} are not {attribute} classes of this data; "
                         f"valid keys: {sorted(phrases)}")
    index, names, keys = build_class_index(phrases, {**phrases, **(overrides or {})})
    captions = {key: captions_from_templates(name, templates) for key, name in zip(keys, names)}
    records = []
    for record in record_set.records:
        if record.label < 0:
            records.append(record)
            continue
        key = parsed[record.label].key(attribute)
        records.append(ImageTextRecord(record.image, list(captions[key]), index[key]))
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

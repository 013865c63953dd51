"""PlantVillage (Hughes & Salathe, 2015): leaf images in ``<Crop>___<Disease>`` classes."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from domainclip.core.data.sources import DataSourceConfig
from domainclip.core.data.record_dataset import RecordImageDataset

from ..prompts import ATTRIBUTES, LEAF_TEMPLATES
from .formats import leaf_classes, load_leaf_records, relabel

Sample = dict[str, Any]
SOURCE = "https://github.com/spMohanty/PlantVillage-Dataset (CC BY-SA 3.0)"


class PlantVillage(RecordImageDataset):
    """Leaf images as dict samples: ``image`` (float ``(3, H, W)`` in [0, 1]), ``label`` (index under
    ``label_attribute``), ``class_name`` (its phrase), ``crop``, ``disease``, ``path``.

    Every sample carries both attributes, whichever one is the label. An unreadable image gives
    ``{"bad": (path, reason), "index": i}`` (counted by the caller, never raised).

    Args:
        root: a folder with ``<split>.csv`` manifests, a folder of class folders, or a label CSV.
        split: manifest / folder name (``train``, ``val``, ``test``); ``""`` for a flat layout.
        label_attribute: ``full`` (raw class), ``crop`` or ``disease``.
        templates: prompt templates of the record captions.
        transforms: optional ``sample -> sample`` callable.
        download: PlantVillage has no stable download API; ``True`` raises with where to get it.
    """

    def __init__(self, root: str, split: str = "train", label_attribute: str = "full",
                 templates: Sequence[str] = LEAF_TEMPLATES, transforms: Callable[[Sample], Sample] | None = None,
                 download: bool = False) -> None:
        if download:
            raise NotImplementedError(f"PlantVillage: no automatic download; get it from {SOURCE} "
                                      "and pass its folder as root")
        if label_attribute not in ATTRIBUTES:
            raise ValueError(f"label_attribute must be one of {ATTRIBUTES}, got {label_attribute!r}")
        source = DataSourceConfig(format="plantvillage", path=str(root), split=split, templates=list(templates))
        full = load_leaf_records(source, "full")
        labelled = full if label_attribute == "full" else relabel(full, label_attribute, list(templates))
        parsed = leaf_classes(full)
        self.leaf_of = {r.image: parsed[r.label] for r in full.records if r.label >= 0}
        self.records = labelled.records
        self.class_names = list(labelled.class_names)
        self.skipped = list(full.skipped)
        self.label_attribute = label_attribute
        self.transforms = transforms

    def sample_fields(self, record: Any) -> dict[str, Any]:
        leaf = self.leaf_of[record.image]
        return {"label": record.label, "class_name": self.class_names[record.label],
                "crop": leaf.crop, "disease": leaf.disease}

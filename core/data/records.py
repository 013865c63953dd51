"""Plain records that every data source produces: one image path, its captions, its label.

Loading a data set is split in two steps. ``load_records`` (in ``sources.py``) reads only the
manifest (never the images, which may be millions) and returns a ``RecordSet``; the datasets in
``dataset.py`` and ``webdataset.py`` open the images later, one at a time.

Class indices. A labelled set numbers its classes by the **sorted raw class names** (the folder
names or the label column's values), so the same classes give the same indices on every machine
and in every split. When all raw names are whole numbers they are sorted numerically (``"2"``
before ``"10"``), otherwise as strings. ``RecordSet.class_names[i]`` is the natural-language name
of label ``i``: ``DataSourceConfig.class_names[raw]`` when given, else the raw name with ``_``
replaced by spaces and runs of spaces collapsed (``"Apple___Black_rot"`` -> ``"Apple Black rot"``).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field


@dataclass
class ImageTextRecord:
    """One image and what describes it.

    Attributes:
        image: path of the image file (already joined with the source's image root).
        captions: every caption of the image; training samples one per step.
        label: class index into ``RecordSet.class_names``, or -1 when the image has no label.
        group: id of the object the image is one view of (e.g. the CT volume of a slice), used by
            group-level evaluation (``core/eval/groups.py``); "" = none. A stable id that
            identifies no person (a manifest row number, a hash), never a patient ID.
    """

    image: str
    captions: list[str]
    label: int = -1
    group: str = ""


@dataclass
class RecordSet:
    """The records of one split plus what is needed to interpret their labels.

    Attributes:
        records: the kept records, in manifest order (folders: sorted by class, then file name).
        class_names: natural-language name of label ``i`` at position ``i``; empty when unlabelled.
        raw_class_names: the raw class names in the same order (folder names, label values).
            Added field: needed to map predictions back to the data's own class ids.
        skipped: ``(item, reason)`` for every manifest row or file that was not turned into a
            record (e.g. a row with neither caption nor label), so nothing is dropped silently.
            Added field.
    """

    records: list[ImageTextRecord]
    class_names: list[str] = field(default_factory=list)
    raw_class_names: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> ImageTextRecord:
        return self.records[index]

    def __iter__(self) -> Iterator[ImageTextRecord]:
        return iter(self.records)


def natural_class_name(raw_name: str, mapping: Mapping[str, str] | None = None) -> str:
    """Name used in captions for a raw class name: the mapping's entry, else a readable form."""
    if mapping and raw_name in mapping:
        return mapping[raw_name]
    return " ".join(raw_name.replace("_", " ").split())


def sorted_class_names(raw_names: Iterable[str]) -> list[str]:
    """Unique raw class names in index order (numeric order if all are integers, else string order)."""
    unique = set(raw_names)
    if unique and all(_is_integer(name) for name in unique):
        return sorted(unique, key=lambda name: (int(name), name))
    return sorted(unique)


def build_class_index(
    raw_names: Iterable[str], mapping: Mapping[str, str] | None = None
) -> tuple[dict[str, int], list[str], list[str]]:
    """Number the classes: returns (raw name -> index, natural names, raw names in index order).

    The classes are the raw names found in the data plus every key of ``mapping``, so a split
    that happens to lack a class still numbers the classes like the other splits do when the
    mapping lists them all.
    """
    ordered = sorted_class_names([*raw_names, *(mapping or {})])
    index = {name: i for i, name in enumerate(ordered)}
    return index, [natural_class_name(name, mapping) for name in ordered], ordered


def captions_from_templates(class_name: str, templates: list[str]) -> list[str]:
    """Every template applied to one natural class name (one caption per template)."""
    if not templates:
        raise ValueError("templates is empty: need at least one prompt template such as 'a photo of a {}.'")
    captions = []
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}' for the class name")
        captions.append(template.replace("{}", class_name))
    return captions


def _is_integer(text: str) -> bool:
    stripped = text.strip()
    return bool(stripped) and stripped.lstrip("+-").isdigit()

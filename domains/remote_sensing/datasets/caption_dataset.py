"""Base class of the caption data sets (torchgeo style: ``root``, ``split``, dict samples)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar


from domainclip.core.data.records import RecordSet
from domainclip.core.data.sources import load_records

from domainclip.core.data.record_dataset import RecordImageDataset
from .presets import CaptionPreset, preset_source

Sample = dict[str, Any]


class CaptionDataset(RecordImageDataset):
    """A Karpathy-layout caption data set read through its registered preset.

    Samples are dicts: ``image`` (float tensor ``(3, H, W)`` in [0, 1]), ``captions`` (list of
    str), ``label`` (scene class index, -1 without one), ``path``; ``transforms`` (a
    ``sample -> sample`` callable, torchgeo style) runs on each. An unreadable image gives
    ``{"bad": (path, reason), "index": i}`` (the kit's convention: counted, never raised).

    Args:
        root: the data set's folder (holding its caption JSON) or the JSON file.
        split: ``train``, ``val``, ``test`` or several joined by commas; ``""`` = all.
        scenes: keep only images with a scene class (the ``<name>_scenes`` format).
        transforms: optional ``sample -> sample`` callable.
        download: these sets have no stable public download; ``True`` raises with where to get them.
    """

    preset: ClassVar[CaptionPreset]

    def __init__(self, root: str, split: str = "train", scenes: bool = False,
                 transforms: Callable[[Sample], Sample] | None = None, download: bool = False) -> None:
        if download:
            raise NotImplementedError(
                f"{type(self).__name__}: no automatic download (the authors publish it through "
                f"{self.preset.source}); download it by hand and pass its folder as root")
        self.root = str(root)
        self.split = split
        self.transforms = transforms
        self.source = preset_source(self.preset.name, self.root, split, scenes=scenes)
        self.records: RecordSet = load_records(self.source)

    @property
    def class_names(self) -> list[str]:
        return list(self.records.class_names)

    def sample_fields(self, record: Any) -> dict[str, Any]:
        return {"captions": list(record.captions), "label": record.label}

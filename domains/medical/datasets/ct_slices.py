"""Axial CT slices of the volumes in a manifest, with organ captions and an organ-presence label."""
from __future__ import annotations

import os
from collections.abc import Callable

from domainclip.core.data.sources import DataSourceConfig

from ..ct_records import SliceOptions, load_ct_slices
from .common import MedicalRecordDataset, Sample


class CTSlices(MedicalRecordDataset):
    """Samples ``{"image": (3, H, W), "captions", "label", "path"}`` (``ct_records.py``).

    Args:
        manifest: CSV with ``image`` (volume), ``label_map``, ``label_names`` (and ``split``).
        organ: label = presence of this organ (classes ``absent`` / ``present``); ``""`` = none.
        split: keep the manifest rows of this split.
        options: windows / 2.5D slab / stride / minimum voxels.
        transforms: optional ``sample -> sample`` callable.
    """

    def __init__(self, manifest: str | os.PathLike[str], organ: str = "", split: str = "",
                 options: SliceOptions = SliceOptions(), transforms: Callable[[Sample], Sample] | None = None) -> None:
        cfg = DataSourceConfig(format="ct_slices", path=os.fspath(manifest), label_key=organ, split=split)
        super().__init__(load_ct_slices(cfg, options), transforms)

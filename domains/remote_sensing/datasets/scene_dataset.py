"""Scene classification samples from any labelled source (torchgeo-style dict samples)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


from domainclip.core.data.sources import DataSourceConfig, load_records
from domainclip.core.data.record_dataset import RecordImageDataset

Sample = dict[str, Any]


class SceneDataset(RecordImageDataset):
    """Images with a scene class: ``{"image", "label", "class_name", "path"}`` samples.

    Args:
        source: a labelled data source, e.g. ``DataSourceConfig(format="scene_folders", path=root)``,
            ``format="scene_label_csv"`` or ``format="rsicd_scenes"``.
        transforms: optional ``sample -> sample`` callable.

    Records without a label (-1) are left out and counted in ``skipped`` (with the reasons the
    source gave for rows it did not read), so no image is ever mislabelled.
    """

    def __init__(self, source: DataSourceConfig, transforms: Callable[[Sample], Sample] | None = None) -> None:
        records = load_records(source)
        if not records.class_names:
            raise ValueError(f"{source.format} source {source.path!r} has no classes; scene classification "
                             "needs labels (use label_key, a *_scenes format, scene_folders or scene_label_csv)")
        self.records = [r for r in records.records if r.label >= 0]
        self.skipped = [*records.skipped, *((r.image, "no label") for r in records.records if r.label < 0)]
        self.class_names = list(records.class_names)
        self.transforms = transforms

    def sample_fields(self, record: Any) -> dict[str, Any]:
        return {"label": record.label, "class_name": self.class_names[record.label]}

"""Data: manifests -> records -> datasets/streams -> batches, with bad inputs counted, never hidden.

Typical use::

    records = load_records(DataSourceConfig(format="karpathy", path="rsicd/dataset_rsicd.json", split="train"))
    dataset = ImageTextDataset(records, build_image_transform(model.preprocess, train=True), seed=0)
    loader = DataLoader(dataset, batch_size=64, collate_fn=Collator(model.tokenize))
"""
from __future__ import annotations

from .bad_inputs import BadInputReport, TooManyBadInputsError
from .dataset import (
    BadImageError,
    Collator,
    ImageTextDataset,
    SharedEpoch,
    derive_seed,
    open_rgb_image,
    to_rgb,
)
from .records import ImageTextRecord, RecordSet, natural_class_name
from .sources import (
    FORMAT_LOADERS,
    DataSourceConfig,
    MissingColumnError,
    load_records,
    register_format,
    valid_formats,
)
from .transforms import build_image_transform
from .webdataset import ShardWriteResult, WebImageTextStream, build_webdataset, expand_shard_pattern, write_shards

__all__ = [
    "FORMAT_LOADERS",
    "BadImageError",
    "BadInputReport",
    "Collator",
    "DataSourceConfig",
    "ImageTextDataset",
    "ImageTextRecord",
    "MissingColumnError",
    "RecordSet",
    "ShardWriteResult",
    "SharedEpoch",
    "TooManyBadInputsError",
    "WebImageTextStream",
    "build_image_transform",
    "build_webdataset",
    "derive_seed",
    "expand_shard_pattern",
    "load_records",
    "natural_class_name",
    "open_rgb_image",
    "register_format",
    "to_rgb",
    "valid_formats",
    "write_shards",
]

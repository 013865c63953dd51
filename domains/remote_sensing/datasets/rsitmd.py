"""RSITMD (Yuan et al., 2022): 4,743 remote-sensing images with 5 fine-grained captions each."""
from __future__ import annotations

from .caption_dataset import CaptionDataset
from .presets import CaptionPreset, register_preset

RSITMD_PRESET = register_preset(CaptionPreset(
    name="rsitmd", json_names=("dataset_RSITMD.json", "dataset_rsitmd.json"), image_dirs=("images", "RSITMD_images"),
    scene_labels=True, source="https://github.com/xiaoyuan1996/AMFMN/tree/master/RSITMD"))


class RSITMD(CaptionDataset):
    """RSITMD: ``dataset_RSITMD.json`` + ``images/``; scene class = file-name prefix
    (``baseballfield_452.tif``), names normalised by :func:`normalise_class_name`."""

    preset = RSITMD_PRESET

"""RSICD (Lu et al., 2017): 10,921 aerial scenes with 5 captions each, 30 scene classes."""
from __future__ import annotations

from ..prompts import RSICD_CLASS_NAMES
from .caption_dataset import CaptionDataset
from .presets import CaptionPreset, register_preset

RSICD_PRESET = register_preset(CaptionPreset(
    name="rsicd", json_names=("dataset_rsicd.json",), image_dirs=("RSICD_images", "images"),
    scene_labels=True, class_names=RSICD_CLASS_NAMES,
    source="https://github.com/201528014227051/RSICD_optimal"))


class RSICD(CaptionDataset):
    """RSICD: ``dataset_rsicd.json`` + ``RSICD_images/``; scene class = file-name prefix."""

    preset = RSICD_PRESET

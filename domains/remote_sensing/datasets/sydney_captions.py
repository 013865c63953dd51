"""Sydney-captions (Qu et al., 2016): 613 aerial images of Sydney with 5 captions each."""
from __future__ import annotations

from .caption_dataset import CaptionDataset
from .presets import CaptionPreset, register_preset

SYDNEY_CAPTIONS_PRESET = register_preset(CaptionPreset(
    name="sydney_captions", json_names=("dataset.json", "dataset_sydney.json"), image_dirs=("imgs", "images"),
    source="https://github.com/201528014227051/RSICD_optimal (Sydney-captions)"))


class SydneyCaptions(CaptionDataset):
    """Sydney-captions: ``dataset.json`` + ``imgs/``; numeric file names, so captions only."""

    preset = SYDNEY_CAPTIONS_PRESET

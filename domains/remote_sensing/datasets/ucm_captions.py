"""UCM-captions (Qu et al., 2016): the 2,100 UC Merced images with 5 captions each."""
from __future__ import annotations

from .caption_dataset import CaptionDataset
from .presets import CaptionPreset, register_preset

UCM_CAPTIONS_PRESET = register_preset(CaptionPreset(
    name="ucm_captions", json_names=("dataset.json", "dataset_ucm.json"), image_dirs=("imgs", "images"),
    source="https://github.com/201528014227051/RSICD_optimal (UCM-captions)"))


class UCMCaptions(CaptionDataset):
    """UCM-captions: ``dataset.json`` + ``imgs/``; numeric file names, so captions only
    (UC Merced's scene labels come through :class:`TorchGeoScenes` ``ucmerced``)."""

    preset = UCM_CAPTIONS_PRESET

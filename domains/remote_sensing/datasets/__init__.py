"""Remote-sensing data sets: one class per file, dict samples, nothing downloaded unless asked.

Importing this package registers the data formats ``rsicd``, ``rsicd_scenes``, ``ucm_captions``,
``sydney_captions``, ``rsitmd``, ``rsitmd_scenes``, ``scene_folders``, ``scene_label_csv``,
``torchgeo_ucmerced`` and ``torchgeo_resisc45`` (see docs/remote_sensing.md).
"""
from __future__ import annotations

from .caption_dataset import CaptionDataset
from .presets import NO_SCENE_CLASS, PRESETS, CaptionPreset, preset_source, register_preset
from .rsicd import RSICD
from .rsitmd import RSITMD
from .scene_dataset import SceneDataset
from .scene_formats import load_scene_folders, load_scene_label_csv
from .sydney_captions import SydneyCaptions
from .torchgeo_scenes import TORCHGEO_SETS, TorchGeoScenes, import_torchgeo
from .ucm_captions import UCMCaptions

__all__ = ["NO_SCENE_CLASS", "PRESETS", "RSICD", "RSITMD", "TORCHGEO_SETS", "CaptionDataset", "CaptionPreset",
           "SceneDataset", "SydneyCaptions", "TorchGeoScenes", "UCMCaptions", "import_torchgeo",
           "load_scene_folders", "load_scene_label_csv", "preset_source", "register_preset"]

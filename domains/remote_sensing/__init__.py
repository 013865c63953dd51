"""Remote sensing: caption and scene data sets, overhead prompts, augmentations, multispectral input.

Importing this package registers its data formats (``rsicd``, ``rsicd_scenes``, ...), its
training augmentation (``data.augment: {name: overhead}``), the multispectral input adapter
(``model.input: {name: multispectral}``) and the ``geotiff`` image reader; core loads it by itself when a
recipe names one of them. Heavy optional packages (torchgeo, rasterio, albumentations) are
imported only when used. Training always goes through ``domainclip train`` (core/train/loop.py).
See docs/remote_sensing.md.
"""
from __future__ import annotations

from pathlib import Path

from domainclip.core.cards import CardDomain, register_card_domain

from . import datasets, multispectral_input, transforms
from .prompts import OVERHEAD_TEMPLATES, RSICD_CLASS_NAMES, SCENE_CLASS_NAMES, class_name_map, normalise_class_name

__all__ = ["OVERHEAD_TEMPLATES", "RSICD_CLASS_NAMES", "SCENE_CLASS_NAMES", "class_name_map", "datasets",
           "multispectral_input", "normalise_class_name", "transforms"]

register_card_domain(CardDomain("remote_sensing", Path(__file__).with_name("card_template.md"), package=__name__))

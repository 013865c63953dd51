"""Agriculture: leaf-disease data sets, crop / disease class names, field-photo augmentation.

Importing this package registers its data formats (``plantvillage``, ``plantvillage_crop``,
``plantvillage_disease``) and its training augmentation (``data.augment: {name: field_photo}``);
core loads it by itself when a recipe names one of them. Training always goes through
``domainclip train`` (core/train/loop.py). See docs/agriculture.md.
"""
from __future__ import annotations

from pathlib import Path

from domainclip.core.cards import CardDomain, register_card_domain

from . import datasets, transforms
from .prompts import (ATTRIBUTES, CROP_NAMES, DISEASE_NAMES, LEAF_TEMPLATES, LeafClass, class_phrases, leaf_prompts,
                      parse_class_name)

__all__ = ["ATTRIBUTES", "CROP_NAMES", "DISEASE_NAMES", "LEAF_TEMPLATES", "LeafClass", "class_phrases", "datasets",
           "leaf_prompts", "parse_class_name", "transforms"]

register_card_domain(CardDomain("agriculture", Path(__file__).with_name("card_template.md"), package=__name__))

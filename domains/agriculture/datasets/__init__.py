"""Leaf-disease data sets: one class per file, dict samples, nothing downloaded.

Importing this package registers the data formats ``plantvillage``, ``plantvillage_crop`` and
``plantvillage_disease`` (see docs/agriculture.md).
"""
from __future__ import annotations

from .formats import core_source, dataset_class_names, leaf_classes, load_leaf_records, relabel
from .plantvillage import PlantVillage

__all__ = ["PlantVillage", "core_source", "dataset_class_names", "leaf_classes", "load_leaf_records", "relabel"]

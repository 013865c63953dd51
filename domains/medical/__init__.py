"""Medical imaging: chest X-ray (DICOM, reports, CheXpert labels) and CT (volumes, HU windows).

Importing this package registers its data formats (``cxr_dicom``, ``chexpert``, ``iu_reports``,
``ct_slices``...), its training augmentation (``data.augment: {name: cxr}``) and the corruption set
``chest_xray`` (``robustness.corruptions``, no flips); core loads it by
itself when a recipe names one of them. pydicom, MONAI and nibabel (extra ``medical``) are
imported only when used. No patient identifier reaches a record, log, cache or card (see
``privacy.py``). Training always goes through ``domainclip train`` (core/train/loop.py).
Research use only, not for clinical use. See docs/medical.md.
"""
from __future__ import annotations

from pathlib import Path

from domainclip.core.cards import CardDomain, register_card_domain

from . import datasets, robustness, transforms
from .prompts import (
    CHEXPERT_COLUMNS,
    CT_TEMPLATES,
    CXR_TEMPLATES,
    FINDINGS,
    NEGATIVE_TEMPLATES,
    POSITIVE_TEMPLATES,
    class_name_map,
    clinical_name,
)

__all__ = ["CHEXPERT_COLUMNS", "CT_TEMPLATES", "CXR_TEMPLATES", "FINDINGS", "NEGATIVE_TEMPLATES",
           "POSITIVE_TEMPLATES", "class_name_map", "clinical_name", "datasets", "robustness", "transforms"]

register_card_domain(CardDomain("medical", Path(__file__).with_name("card_template.md"), package=__name__,
                                required_slots=("population",), tags=("not-for-clinical-use",),
                                metadata={"clinical_use": False, "medical_device": False}))

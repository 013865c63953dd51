"""Medical data sets: one class per file, dict samples, ``download=False`` (credentialed data).

Importing this package registers the data formats ``cxr_dicom`` (and ``_frontal``, ``_pa``,
``_ap``, ``_lateral``), ``chexpert`` / ``chexpert_zeros`` / ``chexpert_ignore``, ``iu_reports``,
``ct_slices`` and ``ct_slices_25d`` (see docs/medical.md).
"""
from __future__ import annotations

from . import formats
from .chexpert import CheXpert
from .common import MedicalRecordDataset
from .ct_slices import CTSlices
from .iu_xray import IUXrayReports

__all__ = ["CTSlices", "CheXpert", "IUXrayReports", "MedicalRecordDataset", "formats"]

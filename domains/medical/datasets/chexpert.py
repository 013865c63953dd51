"""CheXpert / MIMIC-CXR-JPG style label CSV as a data set with multi-label targets."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from domainclip.core.data.records import ImageTextRecord, RecordSet

from ..cxr import dicom_records
from ..labels import read_label_csv
from ..prompts import CXR_TEMPLATES, findings_caption
from .common import MedicalRecordDataset, Sample, no_download


class CheXpert(MedicalRecordDataset):
    """Samples with ``targets`` ``(L,)`` float of 0 / 1 / NaN (unknown) for ``findings``.

    Args:
        csv: the label CSV (``Path`` column + finding columns, 1 / 0 / -1 / blank).
        image_root: folder the ``Path`` values start from (default: the CSV's folder).
        findings: label columns to use (default: every CheXpert column in the file).
        uncertain: policy for -1: ``ones``, ``zeros`` or ``ignore`` (NaN).
        blank: policy for blank cells: ``zeros`` or ``ignore``.
        views: DICOM view filter (``PA``/``AP``/``LATERAL``); PNG/JPEG images are kept.
        transforms: optional ``sample -> sample`` callable.
        download: credentialed data (Stanford AIMI / PhysioNet): ``True`` raises.
    """

    def __init__(self, csv: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None,
                 findings: list[str] | None = None, uncertain: str = "ones", blank: str = "zeros",
                 views: tuple[str, ...] = (), transforms: Callable[[Sample], Sample] | None = None,
                 download: bool = False) -> None:
        if download:
            no_download("CheXpert", "https://stanfordaimi.azurewebsites.net and https://physionet.org")
        table = read_label_csv(csv, findings, uncertain, blank)
        self.findings = table.findings
        root = Path(image_root) if image_root else Path(csv).parent
        records = [ImageTextRecord(os.path.join(root, image.strip()),
                                   [findings_caption([f for f, t in zip(table.findings, row) if t == 1.0], CXR_TEMPLATES[0])],
                                   [float(v) for v in row]) for image, row in zip(table.images, table.targets)]
        super().__init__(dicom_records(RecordSet(records), views), transforms)

    def extra(self, index: int) -> Sample:
        return {"targets": torch.tensor(np.asarray(self.records[index].label, dtype=np.float32))}

    def multilabel_records(self) -> RecordSet:
        """Records whose ``label`` is the target vector: core ``ImageTextDataset`` + ``Collator`` then
        give the ``(B, L)`` float labels that ``evaluate_multilabel`` expects."""
        return self.records

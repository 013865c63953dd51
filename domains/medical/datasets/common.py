"""Dict samples over kit records (shared by the medical data set classes)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from domainclip.core.data.dataset import BadImageError, open_rgb_image
from domainclip.core.data.records import RecordSet

Sample = dict[str, Any]


class MedicalRecordDataset(torch.utils.data.Dataset):
    """``{"image": (3, H, W) float in [0, 1], "captions", "label", "path", **extra(i)}`` per record.

    ``path`` is the rendered PNG's pseudonymous path for DICOM sources. An unreadable image gives
    ``{"bad": (path, reason), "index": i}`` (counted by the caller, never raised).
    """

    def __init__(self, records: RecordSet, transforms: Callable[[Sample], Sample] | None = None) -> None:
        self.records = records
        self.transforms = transforms

    @property
    def class_names(self) -> list[str]:
        return list(self.records.class_names)

    def extra(self, index: int) -> Sample:
        """More per-sample fields (multi-label targets...)."""
        return {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        try:
            image = TF.to_dtype(TF.pil_to_tensor(open_rgb_image(record.image)), torch.float32, scale=True)
        except BadImageError as error:
            return {"bad": (record.image, error.reason), "index": index}
        sample = {"image": image, "captions": list(record.captions), "label": record.label, "path": record.image,
                  **self.extra(index)}
        return self.transforms(sample) if self.transforms is not None else sample


def no_download(name: str, where: str) -> None:
    raise NotImplementedError(f"{name}: no automatic download (credentialed / licensed data: {where}); "
                              "download it by hand and pass its folder or CSV")

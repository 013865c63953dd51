"""Dict-sample data sets over records (torchgeo style), shared by the domain data set classes."""
from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from .dataset import BadImageError, open_rgb_image


def rgb_tensor(path: str) -> torch.Tensor:
    """An image file as a float tensor ``(3, H, W)`` in [0, 1] (raises ``BadImageError``)."""
    return TF.to_dtype(TF.pil_to_tensor(open_rgb_image(path)), torch.float32, scale=True)


class RecordImageDataset(torch.utils.data.Dataset):
    """Dict samples over ``self.records``: the image as a tensor, the path, and ``sample_fields``.

    An unreadable image gives ``{"bad": (path, reason), "index": i}`` (counted by the caller, as
    the core loader does); ``self.transforms`` (if any) maps the sample dict.
    """

    records: Any
    transforms: Any = None

    def sample_fields(self, record: Any) -> dict[str, Any]:
        """The per-record fields of a sample besides image and path."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            image = rgb_tensor(record.image)
        except BadImageError as error:
            return {"bad": (record.image, error.reason), "index": index}
        sample = {"image": image, **self.sample_fields(record), "path": record.image}
        return self.transforms(sample) if self.transforms is not None else sample

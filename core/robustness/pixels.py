"""Pixel space: attacks and corruptions act on [0, 1] pixels, the model sees normalised input.

The data pipeline hands out images already normalised with the weights' mean and std
(``core/data/transforms.py``). :class:`PixelSpace` undoes that affine map, so an attack's eps is a
bound on the un-normalised pixels, and applies it again inside the forward pass.
"""
from __future__ import annotations

import torch

from ..backbones.base import PreprocessConfig


class PixelSpace:
    """The mean/std normalisation of a backbone's preprocessing, both ways."""

    def __init__(self, preprocess: PreprocessConfig):
        if preprocess.reader:
            raise ValueError(f"robustness needs 8-bit images scaled to [0, 1]; this model reads its input with "
                             f"preprocess.reader {preprocess.reader!r} (data in its own units), which has no "
                             f"[0, 1] pixel range to bound an attack or a corruption in")
        self.mean = torch.tensor(preprocess.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(preprocess.std).view(1, -1, 1, 1)

    def to_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> pixels in [0, 1] (clamped: undoing is exact up to rounding)."""
        mean, std = self._on(images)
        return (images * std + mean).clamp(0.0, 1.0)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> the model's normalised input."""
        mean, std = self._on(pixels)
        return (pixels - mean) / std

    def _on(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.ndim != 4 or like.shape[1] != self.mean.shape[1]:
            raise ValueError(f"expected images of shape (B, {self.mean.shape[1]}, H, W), got {tuple(like.shape)}")
        return self.mean.to(like), self.std.to(like)

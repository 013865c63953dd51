"""Chest X-ray safe training augmentation, registered as ``cxr`` (``data.augment: {name: cxr}``).

Anatomy is not left-right symmetric (the heart sits on the left, situs inversus exists), so no
horizontal flip unless ``hflip > 0`` is asked for; radiographs are grey, so no colour jitter.
MONAI style: :class:`CXRAugment` is the array transform (``(H, W)`` grey float in [0, 1] ->
``(3, S, S)`` normalised tensor), :class:`CXRAugmentd` the thin dict wrapper on ``{"image", ...}``
that the kit's datasets call.

Steps, each drawn from torch's generator (which the kit seeds per seed, epoch and item):

1. random resized crop of area ``scale`` with aspect ratio near 1 (``ratio``), to ``image_size``;
2. rotation by up to ``max_rotation`` degrees (border filled with black, as outside the film);
3. CLAHE (OpenCV, clip limit ``clahe_clip``, 8x8 tiles) with probability ``clahe``;
4. contrast and brightness change by up to ``contrast`` / ``brightness`` and gamma in
   ``[1 - gamma, 1 + gamma]``, the same for every pixel;
5. optional horizontal flip with probability ``hflip`` (default 0), never for an image whose
   caption says "left" or "right";
6. grey to three identical channels (once, here), then the backbone's mean / std.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from domainclip.core.backbones.base import PreprocessConfig
from domainclip.core.data.transforms import register_transform


LATERALITY = re.compile(r"\b(left|right|sinistral|dextral)\b", re.IGNORECASE)


def grey_array(image: Any) -> np.ndarray:
    """PIL image (any mode) or array -> ``(H, W)`` float32 in [0, 1] (RGB averaged once)."""
    array = np.asarray(image)
    if array.ndim == 3:
        array = array.mean(axis=2) if array.shape[2] in (3, 4) else array[..., 0]
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    return array.astype(np.float32)


def apply_clahe(grey: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a [0, 1] grey image (OpenCV)."""
    import cv2

    uint8 = np.round(np.clip(grey, 0.0, 1.0) * 255).astype(np.uint8)
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(uint8).astype(np.float32) / 255.0


class CXRAugment:
    """Array transform: grey ``(H, W)`` float in [0, 1] -> ``(3, S, S)`` normalised float tensor."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: tuple[float, float] = (0.85, 1.0), ratio: tuple[float, float] = (0.9, 1.1),
                 max_rotation: float = 7.0, contrast: float = 0.15, brightness: float = 0.1, gamma: float = 0.15,
                 clahe: float = 0.0, clahe_clip: float = 2.0, hflip: float = 0.0) -> None:
        if len(mean) not in (1, 3) or len(std) != len(mean):
            raise ValueError(f"mean/std must have 1 or 3 values each, got {len(mean)} and {len(std)}")
        for name, value, high in (("max_rotation", max_rotation, 45.0), ("contrast", contrast, 1.0),
                                  ("brightness", brightness, 1.0), ("gamma", gamma, 0.9),
                                  ("clahe", clahe, 1.0), ("hflip", hflip, 1.0)):
            if not 0.0 <= value <= high:
                raise ValueError(f"data.augment.{name} must be in [0, {high}], got {value}")
        self.image_size, self.scale, self.ratio = image_size, tuple(scale), tuple(ratio)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.max_rotation, self.contrast, self.brightness, self.gamma = max_rotation, contrast, brightness, gamma
        self.clahe, self.clahe_clip, self.hflip = clahe, clahe_clip, hflip
        if clahe:
            try:
                import cv2  # noqa: F401
            except ImportError as error:
                raise ImportError("data.augment.clahe > 0 needs OpenCV: pip install opencv-python-headless") from error

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(()))

    def __call__(self, grey: np.ndarray, allow_flip: bool = True) -> torch.Tensor:
        """Augment one image; ``allow_flip=False`` forbids the flip (a caption says left / right)."""
        if grey.ndim != 2:
            raise ValueError(f"CXRAugment expects a 2-D grey array, got shape {tuple(grey.shape)}")
        if self.clahe and float(torch.rand(())) < self.clahe:
            grey = apply_clahe(grey, self.clahe_clip)
        tensor = torch.from_numpy(np.ascontiguousarray(grey, dtype=np.float32))[None]
        top, left, height, width = v2.RandomResizedCrop.get_params(tensor, list(self.scale), list(self.ratio))  # type: ignore[arg-type]
        tensor = TF.resized_crop(tensor, top, left, height, width, [self.image_size, self.image_size],
                                 interpolation=InterpolationMode.BILINEAR, antialias=True)
        if self.max_rotation:
            tensor = TF.rotate(tensor, self._uniform(-self.max_rotation, self.max_rotation),
                               interpolation=InterpolationMode.BILINEAR, fill=[0.0])
        tensor = tensor.clamp(0.0, 1.0)
        if self.gamma:
            tensor = tensor.pow(math.exp(self._uniform(math.log(1 - self.gamma), math.log(1 + self.gamma))))
        if self.contrast:
            factor = self._uniform(1 - self.contrast, 1 + self.contrast)
            tensor = (tensor - tensor.mean()) * factor + tensor.mean()
        if self.brightness:
            tensor = tensor + self._uniform(-self.brightness, self.brightness)
        tensor = tensor.clamp(0.0, 1.0)
        if self.hflip and float(torch.rand(())) < self.hflip and allow_flip:
            tensor = TF.horizontal_flip(tensor)
        channels = len(self.mean)
        tensor = tensor.expand(channels, -1, -1)
        return TF.normalize(tensor.contiguous(), self.mean, self.std)


class CXRAugmentd:
    """Dict wrapper: ``{"image": PIL or array, "caption": str, ...}`` -> same dict, image augmented.

    ``takes_caption = True`` makes the kit's datasets pass the caption (core ``transform_pair``):
    an image whose caption says "left" or "right" is never flipped, so the caption stays true.
    Called on a bare image it returns the tensor.
    """

    takes_caption = True

    def __init__(self, augment: CXRAugment, keys: Sequence[str] = ("image",)) -> None:
        self.augment = augment
        self.keys = tuple(keys)

    def __call__(self, data: Any) -> Any:
        if not isinstance(data, dict):
            return self.augment(grey_array(data))
        allow_flip = not LATERALITY.search(str(data.get("caption") or ""))
        return {**data, **{key: self.augment(grey_array(data[key]), allow_flip) for key in self.keys}}


@register_transform("cxr")
def build_cxr_transform(preprocess: PreprocessConfig, scale: tuple[float, float] = (0.85, 1.0), **options: Any) -> CXRAugmentd:
    """The ``cxr`` training transform for a backbone's preprocessing (options: see :class:`CXRAugment`)."""
    return CXRAugmentd(CXRAugment(preprocess.image_size, preprocess.mean, preprocess.std, scale=tuple(scale), **options))

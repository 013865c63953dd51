"""Field-photo augmentation for leaf images, registered as ``data.augment: {name: field_photo}``.

Lab data sets such as PlantVillage show one leaf, centred, on a plain (often black, segmented)
background under even light; photos from a field have clutter behind the leaf, changing light,
motion or focus blur, and leaves at many sizes. :class:`FieldPhotoAugment` narrows that gap on a
PIL RGB image, in this order:

1. ``background`` (probability): pixels darker than ``background_threshold`` (every channel, in
   [0, 1]) are the segmented background; they are replaced by a smooth random texture of soil /
   foliage colours (a low-resolution random colour field upsampled bicubically). Leaf pixels are
   left as they are.
2. ``zoom_out`` ``[low, high]``: the image is shrunk by a factor drawn in that range and pasted at
   a random place on a canvas of its own size filled with the same kind of texture, so leaves
   appear smaller than in the lab shots (``[1, 1]`` = off).
3. scale jitter: ``RandomResizedCrop`` to the backbone's image size with area in ``scale``
   (``data.crop_scale``).
4. ``lighting``: brightness, contrast and saturation jitter by up to that fraction, plus a gamma
   in ``[1 - lighting, 1 + lighting]`` (0 = off).
5. ``blur`` (probability): Gaussian blur with sigma drawn in ``blur_sigma``.
6. normalisation with the backbone's ``mean`` / ``std``.

All randomness comes from torch's global generator, which the kit's datasets seed per (seed,
epoch, item), so augmentations are reproducible and independent of loader workers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from domainclip.core.backbones.base import PreprocessConfig
from domainclip.core.data.transforms import INTERPOLATIONS, register_transform

# Soil browns and foliage greens the background texture is drawn from (RGB in [0, 1]).
BACKGROUND_PALETTE = torch.tensor([[0.36, 0.25, 0.15], [0.50, 0.38, 0.24], [0.25, 0.35, 0.15],
                                   [0.40, 0.52, 0.25], [0.60, 0.55, 0.45], [0.18, 0.22, 0.12]])


def random_background(height: int, width: int, cells: int = 6) -> torch.Tensor:
    """A smooth ``(3, H, W)`` texture in [0, 1] mixing :data:`BACKGROUND_PALETTE` colours."""
    weights = torch.rand(len(BACKGROUND_PALETTE), cells, cells) ** 4
    weights = weights / weights.sum(0, keepdim=True)
    coarse = torch.einsum("pc,pij->cij", BACKGROUND_PALETTE, weights)
    fine = F.interpolate(coarse[None], size=(height, width), mode="bicubic", align_corners=False)[0]
    return (fine + 0.04 * torch.randn(3, height, width)).clamp(0.0, 1.0)


def background_mask(image: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(H, W)`` bool: pixels whose every channel is below ``threshold`` (segmented background)."""
    return (image < threshold).all(dim=0)


class FieldPhotoAugment:
    """PIL RGB image -> normalised ``(3, S, S)`` tensor with field-photo variation (module docstring).

    Args:
        image_size: output side ``S``; ``mean`` / ``std``: per-channel normalisation.
        scale: area range of the random resized crop.
        lighting: maximum brightness / contrast / saturation / gamma change (0 = off).
        blur: probability of a Gaussian blur; ``blur_sigma``: its sigma range.
        background: probability of replacing the dark background; ``background_threshold``: what is dark.
        zoom_out: shrink-factor range of the leaf on a textured canvas (``[1, 1]`` = off).
        interpolation: resampling of the crop (``bicubic`` or ``bilinear``).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: tuple[float, float] = (0.6, 1.0), lighting: float = 0.3, blur: float = 0.3,
                 blur_sigma: tuple[float, float] = (0.1, 2.0), background: float = 0.5,
                 background_threshold: float = 0.1, zoom_out: tuple[float, float] = (0.6, 1.0),
                 interpolation: str = "bicubic") -> None:
        checks = {"lighting": 0.0 <= lighting < 1.0, "blur": 0.0 <= blur <= 1.0, "background": 0.0 <= background <= 1.0,
                  "background_threshold": 0.0 <= background_threshold <= 1.0,
                  "zoom_out": len(zoom_out) == 2 and 0.0 < zoom_out[0] <= zoom_out[1] <= 1.0,
                  "blur_sigma": len(blur_sigma) == 2 and 0.0 < blur_sigma[0] <= blur_sigma[1]}
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"data.augment (field_photo): invalid {bad}: lighting in [0, 1), blur / background / "
                             f"background_threshold in [0, 1], zoom_out = [low, high] with 0 < low <= high <= 1, "
                             f"blur_sigma = [low, high] > 0; got lighting={lighting}, blur={blur}, "
                             f"background={background}, background_threshold={background_threshold}, "
                             f"zoom_out={list(zoom_out)}, blur_sigma={list(blur_sigma)}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"field_photo works on RGB images; the backbone normalises {len(mean)} channels")
        self.lighting, self.blur, self.background = lighting, blur, background
        self.threshold, self.zoom_out, self.blur_sigma = background_threshold, tuple(zoom_out), tuple(blur_sigma)
        self.crop = v2.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=INTERPOLATIONS[interpolation],
                                         antialias=True)
        self.jitter = v2.ColorJitter(brightness=lighting, contrast=lighting, saturation=lighting) if lighting else None
        self.normalise = v2.Normalize(mean=list(mean), std=list(std))

    def field_image(self, image: torch.Tensor) -> torch.Tensor:
        """Steps 1-2 on a ``(3, H, W)`` float image in [0, 1] (before crop and colour)."""
        _, height, width = image.shape
        if self.background and float(torch.rand(())) < self.background:
            mask = background_mask(image, self.threshold)
            image = torch.where(mask[None], random_background(height, width), image)
        low, high = self.zoom_out
        if high < 1.0 or low < 1.0:
            factor = low + (high - low) * float(torch.rand(()))
            small_h, small_w = max(1, round(height * factor)), max(1, round(width * factor))
            if (small_h, small_w) != (height, width):
                small = TF.resize(image, [small_h, small_w], antialias=True)
                canvas = random_background(height, width)
                top = int(torch.randint(0, height - small_h + 1, ()))
                left = int(torch.randint(0, width - small_w + 1, ()))
                canvas[:, top:top + small_h, left:left + small_w] = small
                image = canvas
        return image

    def __call__(self, image: Image.Image) -> torch.Tensor:
        tensor = TF.to_dtype(TF.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
        tensor = self.crop(self.field_image(tensor)).clamp(0.0, 1.0)
        if self.jitter is not None:
            tensor = self.jitter(tensor)
            gamma = 1.0 + self.lighting * (2 * float(torch.rand(())) - 1)
            tensor = tensor.clamp(0.0, 1.0) ** gamma
        if self.blur and float(torch.rand(())) < self.blur:
            sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * float(torch.rand(()))
            kernel = 2 * max(1, round(3 * sigma)) + 1
            tensor = TF.gaussian_blur(tensor, [kernel, kernel], [sigma, sigma])
        return self.normalise(tensor)


@register_transform("field_photo")
def build_field_photo_transform(preprocess: PreprocessConfig, scale: tuple[float, float] = (0.6, 1.0),
                                lighting: float = 0.3, blur: float = 0.3, blur_sigma: Sequence[float] = (0.1, 2.0),
                                background: float = 0.5, background_threshold: float = 0.1,
                                zoom_out: Sequence[float] = (0.6, 1.0)) -> FieldPhotoAugment:
    """The ``field_photo`` training transform for a backbone's preprocessing (``data.augment`` options)."""
    return FieldPhotoAugment(preprocess.image_size, preprocess.mean, preprocess.std, scale=tuple(scale),
                             lighting=lighting, blur=blur, blur_sigma=tuple(blur_sigma), background=background,
                             background_threshold=background_threshold, zoom_out=tuple(zoom_out),
                             interpolation=preprocess.interpolation)

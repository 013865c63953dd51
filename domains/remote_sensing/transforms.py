"""Training augmentation for overhead imagery (albumentations), registered as ``overhead``.

``data.augment: {name: overhead, caption_policy: rewrite}`` in a recipe makes the core loop build
:class:`OverheadAugmentd` (core/data/transforms.py ``register_transform``). MONAI style: the array
transform :class:`OverheadAugment` works on an ``(H, W, C)`` float array with any number of bands;
the dict wrapper :class:`OverheadAugmentd` takes ``{"image": PIL or array, "caption": str}``
and keeps the caption true to the augmented image.

Steps: scale jitter (random resized crop to ``image_size`` with area in ``scale`` and aspect
ratio 3/4..4/3), then orientation, then optional photometric jitter, then per-band
normalisation with the backbone's ``mean`` / ``std``.

Orientation. A caption without direction words gets one of the 8 elements of the dihedral group
D4 (rotations by 0/90/180/270 degrees, with or without a flip), uniformly. A caption with
direction words ("on the left", "north", see ``orientation.py``) follows ``caption_policy``:

* ``rewrite`` -- only the axis-preserving elements (identity, horizontal flip, vertical flip,
  180-degree rotation) are drawn, and the caption is rewritten to match ("left" <-> "right" after
  a horizontal flip, "top" <-> "bottom" after a vertical one);
* ``skip`` -- no orientation change is applied to that item (the crop still is).

Colour. ``brightness_contrast`` jitters brightness and contrast by up to that fraction (the same
factor for every band). ``hue_shift`` (degrees of hue) exists only for 3-band RGB input: hue
is undefined for multispectral bands, so asking for it with another band count is an error.

Randomness comes from torch's generator, which the kit's datasets seed per (seed, epoch, item),
so augmentations are reproducible and independent of the number of loader workers.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from domainclip.core.backbones.base import PreprocessConfig
from domainclip.core.data.transforms import register_transform

from .orientation import has_direction_words, rewrite_caption

CAPTION_POLICIES = ("rewrite", "skip")
ORIENTATIONS = ("all", "axes", "none")


class OverheadAugment:
    """Array transform: ``(H, W, C)`` float array in [0, 1] -> ``(C, S, S)`` float tensor.

    Args:
        image_size: output side ``S``.
        mean, std: per-band normalisation (one value per band).
        scale: area range of the random resized crop (scale jitter).
        rotate: draw 90-degree rotations when orientation is free (with ``flip``: the whole D4 group).
        flip: draw horizontal / vertical flips.
        brightness_contrast: maximum brightness / contrast change (0 = off).
        hue_shift: maximum hue shift in degrees (RGB only; 0 = off).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 scale: tuple[float, float] = (0.8, 1.0), rotate: bool = True, flip: bool = True,
                 brightness_contrast: float = 0.0, hue_shift: float = 0.0) -> None:
        import albumentations as A

        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} bands but std has {len(std)}")
        if hue_shift and len(mean) != 3:
            raise ValueError(f"hue_shift={hue_shift}: hue is defined for 3-band RGB only, but the input has "
                             f"{len(mean)} bands (multispectral); set hue_shift: 0")
        self.bands = len(mean)
        crop = A.RandomResizedCrop(size=(image_size, image_size), scale=tuple(scale), ratio=(3 / 4, 4 / 3), p=1.0)
        colour = []
        if brightness_contrast:
            colour.append(A.RandomBrightnessContrast(brightness_limit=brightness_contrast,
                                                     contrast_limit=brightness_contrast, p=0.8))
        if hue_shift:
            colour.append(A.HueSaturationValue(hue_shift_limit=hue_shift, sat_shift_limit=0, val_shift_limit=0, p=0.8))
        normalise = A.Normalize(mean=list(mean), std=list(std), max_pixel_value=1.0)
        flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)] if flip else []
        rotations = [A.D4(p=1.0)] if flip else [A.RandomRotate90(p=1.0)]
        orient = {"none": [], "all": rotations if rotate else flips, "axes": flips}
        self.pipelines = {name: A.Compose([crop, *steps, *colour, normalise], save_applied_params=True)
                          for name, steps in orient.items()}

    def __call__(self, image: np.ndarray, orientation: str = "all") -> tuple[torch.Tensor, list[str]]:
        """Augment ``image``; returns the tensor and the flips applied (``hflip``/``vflip``)
        when ``orientation`` is ``axes`` (the ones a caption rewrite needs)."""
        if orientation not in ORIENTATIONS:
            raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
        if image.ndim != 3 or image.shape[2] != self.bands:
            raise ValueError(f"expected an (H, W, {self.bands}) array, got shape {tuple(image.shape)}")
        pipeline = self.pipelines[orientation]
        pipeline.set_random_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        result = pipeline(image=np.ascontiguousarray(image, dtype=np.float32))
        applied = [name for name, _ in result["applied_transforms"]]
        flips = [{"HorizontalFlip": "hflip", "VerticalFlip": "vflip"}[n] for n in applied
                 if n in ("HorizontalFlip", "VerticalFlip")]
        return torch.from_numpy(np.ascontiguousarray(result["image"].transpose(2, 0, 1))), flips


def as_float_array(image: Any) -> np.ndarray:
    """PIL image (8-bit) or array -> ``(H, W, C)`` float32; 8-bit data is scaled to [0, 1].

    A torch tensor is a ``(C, H, W)`` band stack from an image reader (multispectral GeoTIFFs,
    in the data's own units): it is transposed and kept unscaled.
    """
    if isinstance(image, torch.Tensor):
        return image.detach().float().permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


class OverheadAugmentd:
    """Dict wrapper: ``{"image", "caption"}`` -> same keys, caption consistent with the image.

    ``takes_caption = True`` tells the kit's datasets to pass the caption along
    (core/data/dataset.py ``transform_pair``).
    """

    takes_caption = True

    def __init__(self, augment: OverheadAugment, caption_policy: str = "rewrite") -> None:
        if caption_policy not in CAPTION_POLICIES:
            raise ValueError(f"data.augment.caption_policy must be one of {CAPTION_POLICIES}, got {caption_policy!r}")
        self.augment = augment
        self.caption_policy = caption_policy

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        caption = data.get("caption") or ""
        directional = has_direction_words(caption)
        orientation = "all" if not directional else ("axes" if self.caption_policy == "rewrite" else "none")
        tensor, flips = self.augment(as_float_array(data["image"]), orientation)
        if directional and flips:
            caption = rewrite_caption(caption, flips)
        return {**data, "image": tensor, "caption": caption}


@register_transform("overhead")
def build_overhead_transform(preprocess: PreprocessConfig, scale: tuple[float, float] = (0.8, 1.0),
                             caption_policy: str = "rewrite", rotate: bool = True, flip: bool = True,
                             brightness_contrast: float = 0.0, hue_shift: float = 0.0) -> OverheadAugmentd:
    """The ``overhead`` training transform for a backbone's preprocessing (``data.augment`` options)."""
    augment = OverheadAugment(preprocess.image_size, preprocess.mean, preprocess.std, scale=scale, rotate=rotate,
                              flip=flip, brightness_contrast=brightness_contrast, hue_shift=hue_shift)
    return OverheadAugmentd(augment, caption_policy)

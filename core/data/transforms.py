"""Image transforms built from a backbone's ``PreprocessConfig`` (torchvision v2).

Evaluation reproduces the preprocessing the weights were trained with: resize the shortest
side to ``image_size`` then centre-crop (``resize_mode="shortest"``), or resize both sides
(``"squash"``); scale pixels to [0, 1]; normalise with the config's mean and std. Training
replaces the resize/crop with ``RandomResizedCrop(scale)``; the default scale (0.9, 1.0) is a
mild crop suited to fine-tuning, where strong augmentation costs zero-shot robustness.

Geometric steps run on the PIL image (as open_clip's preprocessing does, so a fine-tuned model
sees the same pixels at training and inference time); then the image becomes a float tensor.

Multispectral input. When ``preprocess.reader`` names an image reader (registered by a domain
with :func:`register_image_reader`, e.g. ``geotiff``), the transform is a :class:`ReadingTransform`:
its ``open_image(path)`` returns a ``(C, H, W)`` float tensor in the data's units and the same
resize/crop steps run on that tensor (any number of channels), then per-band ``Normalize``; no
scaling to [0, 1] and no colour step. Datasets open files with ``transform.open_image`` when the
transform has one, else with ``open_rgb_image``.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from domainclip.core.backbones.base import PreprocessConfig
from domainclip.core.plugins import require_registered

INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def build_image_transform(
    preprocess: PreprocessConfig, train: bool, scale: tuple[float, float] = (0.9, 1.0)
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised float tensor ``(preprocess.channels, S, S)``, S = image_size."""
    size = preprocess.image_size
    if size <= 0:
        raise ValueError(f"preprocess image_size must be positive, got {size}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    interpolation = INTERPOLATIONS[preprocess.interpolation]
    steps: list[Callable] = []
    if train and tuple(scale) != (1.0, 1.0):
        steps.append(v2.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True))
    elif preprocess.resize_mode == "squash":  # also training with crop_scale (1, 1): the evaluation geometry
        steps.append(v2.Resize((size, size), interpolation=interpolation, antialias=True))
    else:
        steps += [v2.Resize(size, interpolation=interpolation, antialias=True), v2.CenterCrop(size)]
    if preprocess.reader:
        steps.append(v2.Normalize(mean=list(preprocess.mean), std=list(preprocess.std)))
        return with_reader(v2.Compose(steps), preprocess)
    if preprocess.channels == 1:
        steps.append(v2.Grayscale(num_output_channels=1))
    elif preprocess.channels != 3:
        raise ValueError(
            f"preprocess has {preprocess.channels} channels (len(mean)); images are RGB, so only 1 or 3 are supported"
        )
    steps.append(ToNormalizedTensor(preprocess.mean, preprocess.std))
    return v2.Compose(steps)


class ToNormalizedTensor:
    """PIL image or ``uint8`` tensor ``(..., C, H, W)`` -> float tensor scaled to [0, 1] and normalised.

    The values are those of ``v2.ToImage()``, ``v2.ToDtype(float32, scale=True)``,
    ``v2.Normalize(mean, std)`` bit for bit (the same operations in the same order), computed in
    one pass: from a PIL image the three v2 calls cost 1.5x the time of this one (most of it
    normalising v2's channels-last strided tensor), and the pixels then feed the model through
    this step on every image, at training and at inference. Its result is contiguous. Any other
    input (other PIL modes, float tensors, ``tv_tensors``) takes the three v2 steps.
    """

    def __init__(self, mean: tuple[float, ...] | list[float], std: tuple[float, ...] | list[float]) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if not all(std):
            raise ValueError(f"std must not contain 0 (it divides), got {list(std)}")
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        self.fallback = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                    v2.Normalize(mean=list(mean), std=list(std))])

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        pixels = uint8_pixels(image)
        if pixels is None:
            return self.fallback(image)
        scaled = pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255)
        return scaled.sub(self.mean.to(scaled.device)).div_(self.std.to(scaled.device))  # v2 broadcasts the same way

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def uint8_pixels(image: object) -> torch.Tensor | None:
    """``(C, H, W)`` (or batched) ``uint8`` pixels of an 8-bit PIL image or a plain ``uint8`` tensor, else None."""
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L"):
            return None
        pixels = torch.from_numpy(np.array(image))  # a copy: PIL's buffer is read-only
        return pixels.unsqueeze(0) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    if type(image) is torch.Tensor and image.dtype == torch.uint8 and image.ndim >= 3:
        return image
    return None


# --- named training augmentations (registered by domains) --------------------------------------
TransformFactory = Callable[..., Callable]
TRAIN_TRANSFORMS: dict[str, TransformFactory] = {}


def register_transform(name: str) -> Callable[[TransformFactory], TransformFactory]:
    """Decorator: make ``data.augment: {name: <name>, ...}`` build a training transform.

    The factory is called as ``factory(preprocess, scale=(low, high), **options)`` and returns a
    transform of a PIL image, or of ``{"image", "caption"}`` when it sets ``takes_caption = True``
    (see ``dataset.transform_pair``).
    """

    def register(factory: TransformFactory) -> TransformFactory:
        TRAIN_TRANSFORMS[name] = factory
        return factory

    return register


def build_train_transform(preprocess: PreprocessConfig, augment: dict | None,
                          scale: tuple[float, float] = (0.9, 1.0)) -> Callable:
    """The training transform: ``build_image_transform(train=True)`` when ``augment`` is empty,
    else the registered transform ``augment["name"]`` called with the other keys as options."""
    if not augment:
        return build_image_transform(preprocess, train=True, scale=scale)
    options = dict(augment)
    name = options.pop("name", "")
    require_registered(name, TRAIN_TRANSFORMS, f"data.augment.name {name!r} is not a registered transform")
    try:
        return with_reader(TRAIN_TRANSFORMS[name](preprocess, scale=scale, **options), preprocess)
    except TypeError as error:
        raise ValueError(f"data.augment {augment!r}: bad options for transform {name!r}: {error}") from error


# --- image readers for non-PIL input (registered by domains) ------------------------------------
ImageReaderFactory = Callable[..., Callable]
IMAGE_READERS: dict[str, ImageReaderFactory] = {}


def register_image_reader(name: str) -> Callable[[ImageReaderFactory], ImageReaderFactory]:
    """Decorator: make ``preprocess.reader: {name: <name>, ...}`` open image files.

    The factory is called as ``factory(preprocess, **options)`` and returns a picklable callable
    ``path -> (C, H, W) float tensor``; it raises ``BadImageError`` for an unreadable file (the
    item is counted as bad) and any other error for a configuration mistake (training stops).
    """

    def register(factory: ImageReaderFactory) -> ImageReaderFactory:
        IMAGE_READERS[name] = factory
        return factory

    return register


def build_image_reader(preprocess: PreprocessConfig) -> Callable:
    """The registered reader ``preprocess.reader`` names, built with its options."""
    options = dict(preprocess.reader)
    name = options.pop("name", "")
    require_registered(name, IMAGE_READERS, f"preprocess.reader {preprocess.reader!r}: {name!r} is not a "
                                            f"registered image reader")
    return IMAGE_READERS[name](preprocess, **options)


class ReadingTransform:
    """A transform that also knows how to open its input files (``open_image``)."""

    def __init__(self, transform: Callable, reader: Callable) -> None:
        self.transform = transform
        self.open_image = reader

    @property
    def takes_caption(self) -> bool:
        return bool(getattr(self.transform, "takes_caption", False))

    def __call__(self, image):  # noqa: ANN001, ANN204 - a tensor, or a {"image", "caption"} dict
        return self.transform(image)


def with_reader(transform: Callable, preprocess: PreprocessConfig) -> Callable:
    """``transform`` as a :class:`ReadingTransform` when ``preprocess`` names a reader, else as is."""
    return ReadingTransform(transform, build_image_reader(preprocess)) if preprocess.reader else transform

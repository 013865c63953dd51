"""Images for zero-shot classification: paths, PIL images or tensors -> preprocessed batches.

- a path (``str`` / ``os.PathLike``) is opened with the kit's loader (``open_rgb_image``: the same
  mode handling as training) and preprocessed with the weights' ``PreprocessConfig``;
- a PIL image is converted to RGB the same way and preprocessed;
- a ``uint8`` tensor ``(C, H, W)`` holds raw pixels: it becomes a PIL image first, so it gets the
  exact preprocessing of a file with the same pixels;
- a floating-point tensor ``(C, S, S)`` is taken as already preprocessed (normalised, S =
  ``image_size``); a 4-D one ``(B, C, S, S)`` is a batch of such images.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Union

import torch
from PIL import Image

from ..backbones.base import PreprocessConfig
from ..data.dataset import BadImageError, open_rgb_image, to_rgb
from ..data.transforms import build_image_transform

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or a sequence of them -> a flat list; a 4-D tensor is split into its images.

    Paths are checked here, before any work: a missing file raises ``FileNotFoundError`` naming it.
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
        items: list[ImageInput] = [images]
    elif isinstance(images, torch.Tensor):
        items = list(images.unbind(0)) if images.ndim == 4 else [images]
    elif isinstance(images, Sequence):
        items = []
        for item in images:
            items += list(item.unbind(0)) if isinstance(item, torch.Tensor) and item.ndim == 4 else [item]
    else:
        raise TypeError(f"images must be paths, PIL images or tensors (or a list of them), got {type(images).__name__}")
    if not items:
        raise ValueError("images is empty: give at least one image")
    for position, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            if not Path(item).is_file():
                raise FileNotFoundError(f"image {os.fspath(item)!r} does not exist (or is not a file)")
        elif not isinstance(item, (Image.Image, torch.Tensor)):
            raise TypeError(f"image {position} is a {type(item).__name__}; expected a path, a PIL image or a tensor")
    return items


def image_name(item: ImageInput, position: int) -> str:
    """How outputs name an image: its path, else its position in the input (``#3``)."""
    return os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"#{position}"


class ImagePreparer:
    """Turns image inputs into normalised float batches for one ``PreprocessConfig``.

    ``workers`` > 1 decodes and resizes the images of a batch in that many threads (PIL and
    torch release the GIL in the heavy parts); 0 or 1 works in the calling thread.
    """

    def __init__(self, preprocess: PreprocessConfig, workers: int = 0):
        self.preprocess = preprocess
        self.transform: Callable[[Image.Image], torch.Tensor] = build_image_transform(preprocess, train=False)
        self.workers = workers

    def prepare(self, item: ImageInput, position: int) -> torch.Tensor:
        """One image -> ``(channels, S, S)`` float tensor."""
        size, channels = self.preprocess.image_size, self.preprocess.channels
        if isinstance(item, torch.Tensor):
            if item.is_floating_point():
                if tuple(item.shape) != (channels, size, size):
                    raise ValueError(f"image #{position}: a float tensor is taken as preprocessed and must have shape "
                                     f"({channels}, {size}, {size}), got {tuple(item.shape)}; pass raw pixels as uint8")
                return item.float()
            if item.dtype != torch.uint8 or item.ndim != 3:
                raise ValueError(f"image #{position}: a raw-pixel tensor must be uint8 (C, H, W), got {item.dtype} "
                                 f"of shape {tuple(item.shape)}")
            from torchvision.transforms.functional import to_pil_image

            item = to_pil_image(item)
        if isinstance(item, Image.Image):
            try:
                return self.transform(to_rgb(item))
            except BadImageError as error:
                raise ValueError(f"image #{position}: {error.reason}") from None
        try:  # a multispectral preprocessing opens its files with its own reader
            return self.transform(getattr(self.transform, "open_image", open_rgb_image)(item))
        except BadImageError as error:
            raise ValueError(f"image {os.fspath(item)!r}: {error.reason}") from None

    def batches(self, items: Sequence[ImageInput], batch_size: int) -> Iterator[torch.Tensor]:
        """Preprocessed ``(B, C, S, S)`` batches of ``items``, in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        try:
            for start in range(0, len(items), batch_size):
                chunk = list(enumerate(items[start:start + batch_size], start))
                if pool is None:
                    tensors = [self.prepare(item, position) for position, item in chunk]
                else:
                    tensors = list(pool.map(lambda pair: self.prepare(pair[1], pair[0]), chunk))
                yield torch.stack(tensors)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

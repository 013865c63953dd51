"""Map-style image-text dataset, robust image loading, and the batch collator.

Determinism. Everything random about item ``i`` in epoch ``e`` (which caption is drawn, the
crop of ``RandomResizedCrop``) is derived from ``(seed, e, i)`` alone: the caption with its own
generator, the transform inside ``torch.random.fork_rng`` seeded from the same triple. Results
therefore do not depend on the number of DataLoader workers or the order items are fetched
in, and a run resumed mid-epoch sees exactly the samples it would have seen.

Image modes. ``RGB`` is kept; ``L``, ``P``, ``RGBA``, ``LA``, ``CMYK`` and ``1`` go through
PIL's ``convert("RGB")`` (alpha is dropped, as in open_clip's preprocessing, so training and
inference see the same pixels); high-range grey (``I;16`` and its byte-order variants, ``I``,
``F``) is scaled by the image's own minimum..maximum to 0..255 (a constant image becomes 0;
NaN/inf pixels become 0), then replicated to three channels. Any other mode (``LAB``,
``YCbCr``, ...) makes the item bad with reason ``unexpected image mode X``.

Bad items. A missing, truncated or unreadable file never raises: ``__getitem__`` returns
``{"bad": (path, reason), "index": i}`` and ``Collator`` moves it into ``batch["bad"]``, from
where the training loop counts it (``BadInputReport``).
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
from collections.abc import Callable, Sequence
from multiprocessing.context import get_spawning_popen
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .records import ImageTextRecord, RecordSet

Tokenizer = Callable[[list[str]], dict[str, torch.Tensor]]
CONVERTIBLE_MODES = ("RGB", "L", "RGBA", "P", "LA", "CMYK", "1")
HIGH_RANGE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class BadImageError(Exception):
    """An image that cannot be used; ``reason`` says why in a few words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (ints, strings), stable across processes and platforms."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded PIL image to RGB (see the module docstring for each mode)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")  # avoids PIL's palette-transparency warning
    if image.mode in CONVERTIBLE_MODES:
        return image.convert("RGB")
    if image.mode in HIGH_RANGE_GREY_MODES:
        return _scale_grey_to_rgb(np.asarray(image))
    raise BadImageError(f"unexpected image mode {image.mode}")


def _scale_grey_to_rgb(pixels: np.ndarray) -> Image.Image:
    """Grey of any numeric range -> 8-bit RGB, stretching the image's own min..max to 0..255."""
    values = pixels.astype(np.float64)
    finite = np.isfinite(values)
    scaled = np.zeros_like(values)
    if finite.any():
        low, high = values[finite].min(), values[finite].max()
        if high > low:
            scaled = np.where(finite, (values - low) / (high - low) * 255.0, 0.0)
    grey = Image.fromarray(np.round(scaled).astype(np.uint8))  # 2-D uint8 -> mode "L"
    return grey.convert("RGB")


def open_rgb_image(source: str | os.PathLike[str] | IO[bytes]) -> Image.Image:
    """Open and fully decode an image as RGB, or raise ``BadImageError`` with the reason.

    ``load()`` runs inside the try so truncated files fail here, not later in a worker's
    transform; truncated images are never accepted (LOAD_TRUNCATED_IMAGES stays off). An EXIF
    orientation (phone photos) is applied, so the model sees the image upright, as it is shown
    (and as transformers' ``load_image`` reads it).
    """
    try:
        with Image.open(source) as image:
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
            return to_rgb(image)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise BadImageError(f"cannot read image: {type(error).__name__}: {error}") from error


class SharedEpoch:
    """An epoch counter that DataLoader workers (persistent ones too) read from shared memory.

    Pickled outside of process start-up (deepcopy, saving) it degrades to a plain copy.
    """

    def __init__(self, epoch: int = 0) -> None:
        self._value = multiprocessing.RawValue("q", epoch)  # no lock: one writer; works with fork and spawn

    def get(self) -> int:
        return int(self._value.value)

    def set(self, epoch: int) -> None:
        self._value.value = epoch

    def __getstate__(self) -> dict[str, Any]:
        if get_spawning_popen() is None:
            return {"epoch": self.get()}
        return {"value": self._value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._value = state["value"] if "value" in state else multiprocessing.RawValue("q", state["epoch"])


def pick_caption(captions: Sequence[str], train: bool, *seed_parts: object) -> str:
    """Training: one caption drawn from ``seed_parts``; evaluation: the first. "" when none."""
    if not captions:
        return ""
    if not train or len(captions) == 1:
        return captions[0]
    return captions[random.Random(derive_seed(*seed_parts, "caption")).randrange(len(captions))]


def apply_transform(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, *seed_parts: object) -> torch.Tensor:
    """Run ``transform`` with torch's global generator seeded from ``seed_parts`` (restored after)."""
    with torch.random.fork_rng(devices=[]):
        # the CPU generator alone: ``torch.manual_seed`` would also queue a seed for every
        # accelerator backend (CUDA, XPU, MTIA), formatting a stack trace each time (0.5 ms an item)
        torch.default_generator.manual_seed(derive_seed(*seed_parts, "augment"))
        return transform(image)


def transform_pair(transform: Callable, image: Image.Image, caption: str, *seed_parts: object) -> tuple[torch.Tensor, str]:
    """Image (and caption) through ``transform``, seeded like ``apply_transform``.

    A transform with ``takes_caption = True`` (e.g. an augmentation that flips an image and must
    rewrite "on the left" in its caption) gets ``{"image", "caption"}`` and returns that dict;
    any other transform gets the image alone and the caption is kept.
    """
    if getattr(transform, "takes_caption", False):
        out = apply_transform(transform, {"image": image, "caption": caption}, *seed_parts)
        return out["image"], out["caption"]
    return apply_transform(transform, image, *seed_parts), caption


class ImageTextDataset(torch.utils.data.Dataset):
    """Records -> ``{"image", "caption", "label", "index"}`` items (or ``{"bad", "index"}``).

    Args:
        records: a ``RecordSet`` or a list of ``ImageTextRecord``.
        transform: PIL RGB image -> tensor (see ``build_image_transform``).
        seed: base seed of caption draws and augmentations.
        train: draw a caption per step (True) or always use caption 0 (False).

    A transform with an ``open_image(path)`` method (``transforms.ReadingTransform``, for
    multispectral input) opens the files itself; others get ``open_rgb_image``'s PIL image.

    ``load_images = False`` makes items carry an empty ``image`` tensor without opening the file:
    for methods that read image features from a cache (unreadable files were listed when the
    cache was built).
    """

    def __init__(
        self,
        records: RecordSet | list[ImageTextRecord],
        transform: Callable[[Image.Image], torch.Tensor],
        seed: int = 0,
        train: bool = True,
    ) -> None:
        self.records = list(records.records if isinstance(records, RecordSet) else records)
        self.class_names = list(records.class_names) if isinstance(records, RecordSet) else []
        self.transform = transform
        self.seed = seed
        self.train = train
        self._epoch = SharedEpoch(0)
        self.load_images = True

    def __len__(self) -> int:
        return len(self.records)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose caption draws and augmentations ``__getitem__`` produces."""
        self._epoch.set(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        epoch = self.epoch
        if not self.load_images:
            caption = pick_caption(record.captions, self.train, self.seed, epoch, index)
            return {"image": torch.zeros(0), "caption": caption, "source_caption": caption, "label": record.label,
                    "index": index}
        try:
            image = getattr(self.transform, "open_image", open_rgb_image)(record.image)
        except BadImageError as error:
            return {"bad": (record.image, error.reason), "index": index}
        source = pick_caption(record.captions, self.train, self.seed, epoch, index)
        tensor, caption = transform_pair(self.transform, image, source, self.seed, epoch, index)
        # ``source_caption``: the record's caption before an augmentation rewrote it (teachers
        # that saw the un-augmented image are looked up by it)
        return {"image": tensor, "caption": caption, "source_caption": source, "label": record.label, "index": index}


def stack_labels(labels: list[Any]) -> torch.Tensor:
    """Integer labels -> LongTensor (B,); per-item label vectors -> FloatTensor (B, L)."""
    if not labels:
        return torch.zeros(0, dtype=torch.long)
    if all(isinstance(label, (int, np.integer)) for label in labels):
        return torch.tensor(labels, dtype=torch.long)
    if all(isinstance(label, (Sequence, np.ndarray, torch.Tensor)) for label in labels):
        return torch.stack([torch.as_tensor(label, dtype=torch.float32) for label in labels])
    raise TypeError(f"labels in one batch must be all ints or all vectors, got {[type(x).__name__ for x in labels]}")


class Collator:
    """Items -> the batch dict of the shared layout; bad items go to ``batch["bad"]``.

    The batch also carries ``captions`` (the good items' caption strings) and ``source_captions``
    (the same before an augmentation rewrote them, e.g. "on the left" after a flip). When every item is
    bad, ``images``/``labels``/``indices`` (and each token tensor) have zero rows; callers
    skip such a batch after counting its ``bad`` list.

    Args:
        tokenize: texts -> token tensors; ``None`` for image-only loaders (no ``tokens`` key).
            Must be picklable for spawned workers (a module function or a small object).
        image_shape: ``(C, H, W)`` used for the zero-row ``images`` of an all-bad batch;
            ``(3, 0, 0)`` when not given.
    """

    def __init__(self, tokenize: Tokenizer | None = None, image_shape: tuple[int, int, int] | None = None) -> None:
        self.tokenize = tokenize
        self.image_shape = tuple(image_shape) if image_shape else (3, 0, 0)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        good = [item for item in items if "bad" not in item]
        captions = [item["caption"] for item in good]
        if good:
            images = torch.stack([item["image"] for item in good])
        else:
            images = torch.zeros((0, *self.image_shape), dtype=torch.float32)
        batch: dict[str, Any] = {
            "images": images,
            "labels": stack_labels([item["label"] for item in good]),
            "indices": torch.tensor([item["index"] for item in good], dtype=torch.long),
            "captions": captions,
            "source_captions": [item.get("source_caption", item["caption"]) for item in good],
            "bad": [tuple(item["bad"]) for item in items if "bad" in item],
        }
        if self.tokenize is not None:
            if good:
                batch["tokens"] = self.tokenize(captions)
            else:
                batch["tokens"] = {key: value[:0] for key, value in self.tokenize([""]).items()}
        return batch

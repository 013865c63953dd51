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

import io
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image

from ..backbones.base import PreprocessConfig
from ..data.dataset import BadImageError, open_rgb_image, to_rgb
from ..data.transforms import ToNormalizedTensor, build_image_transform, uint8_pixels

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


@dataclass
class EncodeTiming:
    """Where the time of one batched encoding went (seconds).

    Attributes:
        images: images encoded.
        decode_s: time spent decoding, resizing and cropping, summed over the decode threads (can
            exceed ``wall_s`` when several threads decode at once).
        wait_s: time the forward loop waited for decoded images (decoding it did not hide; with
            ``workers=0`` it is the decoding itself).
        normalize_s: time the forward loop spent turning decoded pixels into a batch: scaling,
            normalising and stacking (with ``decode_on``, also the batch's decoding on the device).
        forward_s: time in the model's forward passes (and the classifier head).
        wall_s: the whole call.
        refined: images re-encoded in fp32 by tie refinement (``refine_ties``; their time is in ``forward_s``).
    """

    images: int = 0
    decode_s: float = 0.0
    wait_s: float = 0.0
    normalize_s: float = 0.0
    forward_s: float = 0.0
    wall_s: float = 0.0
    refined: int = 0

    def shares(self) -> dict[str, float]:
        """Decode, normalise and forward as shares of their summed work, and the share of wall time
        the forward loop waited for decoding."""
        parts = {"decode": self.decode_s, "normalize": self.normalize_s, "forward": self.forward_s}
        work = sum(parts.values())
        shares = {f"{name}_share_of_work": seconds / work if work else 0.0 for name, seconds in parts.items()}
        return {**shares, "waiting_share_of_wall": self.wait_s / self.wall_s if self.wall_s else 0.0}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **self.shares()}


class ImagePreparer:
    """Turns image inputs into normalised float batches for one ``PreprocessConfig``.

    ``workers`` >= 1 decodes and resizes images in that many background threads (PIL
    releases the GIL in the heavy parts), up to ``prefetch`` batches ahead of the batch being
    consumed, so decoding overlaps the forward pass of the previous batch; 0 decodes in the
    calling thread, between forward passes. The threads stop at ``uint8`` pixels: each image is
    scaled and normalised in the calling thread (the same values bit for bit). A torch
    operation in a decode thread would start a second team of torch threads beside the forward
    pass's, and on a CPU device the two teams stall each other.

    ``decode_on`` (a device, e.g. ``"cuda"``) decodes JPEG files there instead, a batch at a time
    (``torchvision.io.decode_jpeg``: nvJPEG on a GPU), and resizes, crops and normalises them
    there with the same transform: the threads only read the files. Other inputs (PNG, PIL
    images, tensors, every file of a preprocessing with its own ``reader``, such as multispectral
    ones) take the threads' path, and so does a JPEG that does not end at its end-of-image marker
    or whose header PIL refuses (truncated files, decompression bombs): PIL then accepts or rejects
    it exactly as on the default path. A GPU decoder's pixels can
    differ from libjpeg-turbo's (PIL's) by a few levels, so features differ slightly from the
    default path's (docs/zeroshot.md gives the measured difference); ``None`` (the default)
    decodes everything with PIL.
    """

    def __init__(self, preprocess: PreprocessConfig, workers: int = 0, prefetch: int = 2,
                 decode_on: str | torch.device | None = None):
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = decode in the calling thread), got {workers}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 batch, got {prefetch}")
        self.preprocess = preprocess
        self.transform: Callable[[Image.Image], torch.Tensor] = build_image_transform(preprocess, train=False)
        steps = getattr(self.transform, "transforms", [])
        # None for a reader's transform (multispectral): each image is finished in its thread
        self.normalize: ToNormalizedTensor | None = steps[-1] if steps and isinstance(steps[-1], ToNormalizedTensor) \
            else None
        self.geometry: Callable | None = type(self.transform)(steps[:-1]) if self.normalize is not None else None
        self.workers = workers
        self.prefetch = prefetch
        self.decode_on = torch.device(decode_on) if decode_on is not None else None
        self._lock = threading.Lock()

    def prepare(self, item: ImageInput, position: int, pixels: bool = False) -> torch.Tensor:
        """One image -> ``(channels, S, S)`` float tensor; ``pixels``: stop at ``uint8`` pixels where
        the image has them (``normalize`` finishes them), floats stay floats."""
        size, channels = self.preprocess.image_size, self.preprocess.channels
        if isinstance(item, torch.Tensor):
            if item.is_floating_point():
                if tuple(item.shape) != (channels, size, size):
                    raise ValueError(f"image #{position}: a float tensor is taken as preprocessed and must have shape "
                                     f"({channels}, {size}, {size}), got {tuple(item.shape)}; pass raw pixels as uint8")
                return item.float()
            if item.dtype != torch.uint8 or item.ndim != 3 or item.shape[0] not in (1, 3, 4):
                hint = " (channels last? use tensor.permute(2, 0, 1))" if item.ndim == 3 and item.shape[-1] in (1, 3, 4) else ""
                raise ValueError(f"image #{position}: a raw-pixel tensor must be uint8 (C, H, W) with C = 1, 3 or 4, "
                                 f"got {item.dtype} of shape {tuple(item.shape)}{hint}")
            from torchvision.transforms.functional import to_pil_image

            item = to_pil_image(item)
        if isinstance(item, Image.Image):
            try:
                return self._apply(to_rgb(item), pixels)
            except BadImageError as error:
                raise ValueError(f"image #{position}: {error.reason}") from None
        return self._prepare_file(item, pixels=pixels)

    def _apply(self, image: Image.Image, pixels: bool) -> torch.Tensor:
        if not pixels or self.geometry is None:
            return self.transform(image)
        placed = self.geometry(image)
        raw = uint8_pixels(placed)
        return raw if raw is not None else self.normalize(placed)

    def _prepare_file(self, path: str | os.PathLike, contents: bytearray | None = None,
                      pixels: bool = False) -> torch.Tensor:
        """A file -> tensor; ``contents``: its bytes when a thread already read them (``path``
        still names it in errors)."""
        try:  # a multispectral preprocessing opens its files with its own reader
            opener = getattr(self.transform, "open_image", open_rgb_image)
            return self._apply(opener(path if contents is None else io.BytesIO(contents)), pixels)
        except BadImageError as error:
            raise ValueError(f"image {os.fspath(path)!r}: {error.reason}") from None

    def _timed_prepare(self, item: ImageInput, position: int, timing: EncodeTiming) -> torch.Tensor | JpegBytes:
        started = time.perf_counter()
        try:
            if self.decode_on is not None and not self.preprocess.reader and isinstance(item, (str, os.PathLike)):
                try:
                    contents = bytearray(Path(item).read_bytes())
                except OSError as error:
                    raise ValueError(f"image {os.fspath(item)!r}: cannot read file: {error}") from None
                if device_decodable_jpeg(contents):
                    return JpegBytes(item, contents)
                return self._prepare_file(item, contents, pixels=True)  # read once, decoded by PIL
            return self.prepare(item, position, pixels=True)
        finally:
            elapsed = time.perf_counter() - started
            with self._lock:
                timing.decode_s += elapsed

    def batches(self, items: Sequence[ImageInput], batch_size: int,
                timing: EncodeTiming | None = None) -> Iterator[torch.Tensor]:
        """Preprocessed ``(B, C, S, S)`` batches of ``items``, in order.

        ``timing`` (optional) accumulates decode time and the time spent waiting for a batch.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        timing = timing if timing is not None else EncodeTiming()
        starts = list(range(0, len(items), batch_size))
        if self.workers == 0:
            for start in starts:
                started = time.perf_counter()
                prepared = [self._timed_prepare(item, position, timing)
                            for position, item in enumerate(items[start:start + batch_size], start)]
                timing.wait_s += time.perf_counter() - started
                yield self._stack(prepared, timing)
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="domainclip-decode")
        pending: deque[list[Future]] = deque()
        queued = iter(starts)

        def submit_next() -> None:
            start = next(queued, None)
            if start is not None:
                pending.append([pool.submit(self._timed_prepare, item, position, timing)
                                for position, item in enumerate(items[start:start + batch_size], start)])

        try:
            for _ in range(self.prefetch + 1):  # the first batch and ``prefetch`` ahead of it
                submit_next()
            while pending:
                futures = pending.popleft()
                started = time.perf_counter()
                prepared = [future.result() for future in futures]
                timing.wait_s += time.perf_counter() - started
                yield self._stack(prepared, timing)
                submit_next()  # the consumer is done with that batch: keep ``prefetch`` queued ahead
        finally:
            for futures in pending:
                for future in futures:
                    future.cancel()
            pool.shutdown(wait=True)

    def _stack(self, prepared: list[torch.Tensor | JpegBytes], timing: EncodeTiming) -> torch.Tensor:
        """One batch from the threads' output: ``uint8`` pixels normalised, JPEG files decoded on ``decode_on``."""
        started = time.perf_counter()
        jpegs = [(slot, item) for slot, item in enumerate(prepared) if isinstance(item, JpegBytes)]
        out = list(prepared)
        if jpegs:
            decoded = self._decode_on_device([item for _, item in jpegs])
            out = [item.to(self.decode_on) if isinstance(item, torch.Tensor) else None for item in prepared]
            for (slot, _), tensor in zip(jpegs, decoded):
                out[slot] = tensor
        batch = torch.stack([self.normalize(tensor) if tensor.dtype == torch.uint8 else tensor for tensor in out])
        if batch.is_cuda:
            torch.cuda.synchronize(batch.device)  # the time is the kernels', not their launch
        timing.normalize_s += time.perf_counter() - started
        return batch

    def _decode_on_device(self, jpegs: list[JpegBytes]) -> list[torch.Tensor]:
        """JPEG bytes -> preprocessed float tensors on ``decode_on``; images of one size share the
        transform's calls. A batch the device decoder rejects is decoded with PIL, item by item, so
        a broken file gets the default path's error naming it."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            with warnings.catch_warnings():
                # torchvision 0.29 announces that TorchCodec will take over its image decoders;
                # they work unchanged until then (the note is repeated at every call)
                warnings.simplefilter("ignore", DeprecationWarning)
                pixels = decode_jpeg([torch.frombuffer(item.contents, dtype=torch.uint8) for item in jpegs],
                                     mode=ImageReadMode.RGB, device=self.decode_on, apply_exif_orientation=True)
        except RuntimeError:
            return [self._prepare_file(item.path, item.contents).to(self.decode_on) for item in jpegs]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(pixels):
            by_shape.setdefault(tuple(image.shape), []).append(index)
        out: list[torch.Tensor | None] = [None] * len(pixels)
        for indices in by_shape.values():
            prepared = self.transform(torch.stack([pixels[index] for index in indices]))
            for index, tensor in zip(indices, prepared.unbind(0)):
                out[index] = tensor
        return out


JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"


def device_decodable_jpeg(contents: bytes | bytearray) -> bool:
    """Whether a file's bytes may go to the device's JPEG decoder: a JPEG that ends at its
    end-of-image marker (a truncated file does not) and whose header PIL opens without complaint
    (its decompression-bomb limit included). Anything else is left to PIL, which accepts or
    rejects it exactly as the default path does."""
    if contents[:3] != JPEG_MAGIC or contents.rstrip(b"\x00")[-2:] != JPEG_END:
        return False
    try:
        with Image.open(io.BytesIO(contents)) as header:  # reads the header only
            return header.format == "JPEG"
    except Exception:  # any refusal: PIL's full decode on the default path names the error
        return False


@dataclass
class JpegBytes:
    """A JPEG file read by a thread, to be decoded with its batch on the device."""

    path: str | os.PathLike
    contents: bytearray  # writable: torch.frombuffer shares it without a copy

"""Stream image-text samples from tar shards (WebDataset layout), and write such shards.

A sample is the group of tar members sharing a key: one image (``jpg``, ``jpeg`` or ``png``),
``txt`` (captions, one per line; training draws one per step) and optionally ``cls`` (an
integer label). Shards written by ``write_shards`` use the record's index as key, so
``batch["indices"]`` are record indices; for other shards a non-numeric key gives index -1.

Splitting. Each epoch the shard list is shuffled with a seed derived from ``(seed, epoch)``
(identical on every rank), then dealt out by rank and by DataLoader worker; each worker
shuffles its samples in a buffer seeded from ``(seed, epoch, rank, worker)``. Without
``resampled`` every sample is read exactly once per epoch (ranks may get unequal amounts when
shards are unequal). With ``resampled=True`` shards are drawn with replacement and each rank
yields exactly ``ceil(num_samples / (world_size * batch_size))`` batches, which is what
distributed training needs to keep ranks in step.

Errors never stop the stream: an undecodable image, a sample without image or caption, or an
unreadable shard becomes a bad item ``{"bad": (url#key, reason), "index": ...}`` that the
collator moves to ``batch["bad"]``. A shard that breaks mid-way loses the samples after the
break; that is reported once as a bad item naming the shard.
"""
from __future__ import annotations

import io
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from webdataset.gopen import gopen
from PIL import Image

from .dataset import (BadImageError, Collator, SharedEpoch, derive_seed, open_rgb_image, pick_caption,
                      transform_pair)
from .records import ImageTextRecord, RecordSet
from .sources import DataSourceConfig

STREAM_IMAGE_KEYS = ("jpg", "jpeg", "png")
_MAX_EMPTY_RESAMPLES = 1000


def expand_shard_pattern(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> three paths; several patterns may be joined with ``::``."""
    return wds.shardlists.expand_urls(pattern)


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


class WebImageTextStream(torch.utils.data.IterableDataset):
    """Iterable of items (or of collated batches when ``batch_size`` > 0) read from tar shards.

    Build it with ``build_webdataset``; use it with ``DataLoader(stream, batch_size=None, ...)``
    when it batches itself. ``set_epoch`` reaches persistent workers too.
    """

    def __init__(
        self,
        urls: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        seed: int = 0,
        train: bool = True,
        collate: Callable[[list[dict[str, Any]]], Any] | None = None,
        batch_size: int = 0,
        shuffle_buffer: int = 1000,
        num_samples: int = 0,
        resampled: bool = False,
    ) -> None:
        if not urls:
            raise ValueError("no shards to read (empty shard list)")
        if batch_size < 0 or shuffle_buffer < 0 or num_samples < 0:
            raise ValueError("batch_size, shuffle_buffer and num_samples must be >= 0")
        if resampled and num_samples <= 0:
            raise ValueError("resampled streams are endless: set num_samples (samples per epoch) > 0")
        self.urls = list(urls)
        self.transform = transform
        self.seed = seed
        self.train = train
        self.batch_size = batch_size
        self.collate = collate if collate is not None else (Collator() if batch_size else None)
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.num_samples = num_samples
        self.resampled = resampled
        self._epoch = SharedEpoch(0)

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds shard order, sample shuffle, caption draws and crops."""
        self._epoch.set(epoch)

    def _batches_per_rank(self, world_size: int) -> int:
        return math.ceil(self.num_samples / (world_size * max(self.batch_size, 1)))

    def __len__(self) -> int:
        """Batches (or items) per rank: exact when resampled, nominal from ``num_samples`` otherwise."""
        if not self.num_samples:
            raise TypeError("a webdataset stream has no length unless num_samples is set")
        _, world_size, _, _ = wds.utils.pytorch_worker_info()
        return self._batches_per_rank(world_size)

    # --- pipeline stages -----------------------------------------------------------------------
    def _worker_shards(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> Iterator[str]:
        if self.resampled:
            rng = random.Random(derive_seed(self.seed, epoch, rank, worker, "resample"))
            while True:
                yield rng.choice(self.urls)
        if len(self.urls) < world_size:
            raise ValueError(f"{len(self.urls)} shards cannot feed {world_size} ranks: write at least one shard per rank")
        order = list(self.urls)
        if self.train:
            random.Random(derive_seed(self.seed, epoch, "shards")).shuffle(order)
        yield from order[rank::world_size][worker::num_workers]

    def _raw_samples(self, shards: Iterable[str]) -> Iterator[dict[str, Any]]:
        """Grouped tar members of each shard in turn, plus a bad item per unreadable shard."""
        empty_in_a_row = 0
        for url in shards:
            produced = 0
            for sample in _shard_items(url):
                produced += 1
                yield sample
            empty_in_a_row = 0 if produced else empty_in_a_row + 1
            if self.resampled and empty_in_a_row >= _MAX_EMPTY_RESAMPLES:
                raise RuntimeError(f"{empty_in_a_row} shards drawn in a row held no samples; are the shards empty?")

    def _decode(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        """Raw sample -> item dict like ``ImageTextDataset``'s, or a bad item."""
        if "bad" in sample:
            return sample
        key = sample["__key__"]
        name = f"{sample.get('__url__', '')}#{key}"
        index = int(key) if key.isdigit() else -1
        image_key = next((k for k in STREAM_IMAGE_KEYS if k in sample), None)
        present = sorted(k for k in sample if not k.startswith("__"))
        if image_key is None:
            return {"bad": (name, f"sample has no image ({'/'.join(STREAM_IMAGE_KEYS)}); keys: {present}"), "index": index}
        if "txt" not in sample:
            return {"bad": (name, f"sample has no txt caption; keys: {present}"), "index": index}
        try:
            # one caption per "\n" line (not str.splitlines: \r, \x85 or \u2028 inside a caption are not breaks)
            captions = [line.strip() for line in sample["txt"].decode("utf-8").split("\n") if line.strip()]
            label = int(sample["cls"].decode("utf-8").strip()) if "cls" in sample else -1
        except (UnicodeDecodeError, ValueError) as error:
            return {"bad": (name, f"bad txt/cls entry: {error}"), "index": index}
        if not captions:
            return {"bad": (name, "txt caption is empty"), "index": index}
        try:
            image = open_rgb_image(io.BytesIO(sample[image_key]))
        except BadImageError as error:
            return {"bad": (name, error.reason), "index": index}
        caption = pick_caption(captions, self.train, self.seed, epoch, key)
        tensor, caption = transform_pair(self.transform, image, caption, self.seed, epoch, key)
        return {"image": tensor, "caption": caption, "label": label, "index": index}

    def __iter__(self) -> Iterator[Any]:
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        epoch = self.epoch
        samples: Iterable[dict[str, Any]] = self._raw_samples(
            self._worker_shards(epoch, rank, world_size, worker, num_workers)
        )
        if self.shuffle_buffer > 1:
            rng = random.Random(derive_seed(self.seed, epoch, rank, worker, "samples"))
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        items = (self._decode(sample, epoch) for sample in samples)
        if self.batch_size:
            assert self.collate is not None
            output: Iterator[Any] = (self.collate(chunk) for chunk in _chunks(items, self.batch_size))
        else:
            output = items
        if self.resampled:
            per_rank = self._batches_per_rank(world_size)
            output = _take(output, len(range(worker, per_rank, num_workers)))
        yield from output


# first bytes of gzip, bzip2, xz and zstd streams
COMPRESSION_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


class _TailTracker:
    """Read-through wrapper remembering whether the stream ended and its last bytes.

    Python's ``tarfile`` treats a header cut short at the end of a stream as the end of the
    archive, silently dropping the rest of a truncated shard; a complete tar ends in zero blocks,
    so a stream that reached its end on non-zero bytes was truncated. A compressed shard
    (``.tar.gz`` and the like) is not judged here: its last bytes are the compressor's, never zero,
    and its decompressor reports a cut itself.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.head = b""
        self.tail = b""
        self.reached_end = False

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if not data or (size is not None and size > 0 and len(data) < size):
            self.reached_end = True
        if len(self.head) < 6:
            self.head = (self.head + data)[:6]
        self.tail = (self.tail + data)[-512:]
        return data

    def close(self) -> None:
        self.stream.close()

    def truncated(self) -> bool:
        compressed = self.head.startswith(COMPRESSION_MAGIC)
        return self.reached_end and not compressed and self.tail.strip(b"\0") != b""


def _shard_samples(url: str, handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """Samples of one shard; open/read errors and truncation go to ``handler``."""
    try:
        stream = _TailTracker(gopen(url))
    except (OSError, ValueError) as error:  # missing file, unsupported url scheme
        handler(error)
        return
    try:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}], handler=handler)
        yield from wds.tariterators.group_by_keys(files, handler=handler)
    finally:
        stream.close()
    if stream.truncated():
        handler(EOFError("shard ends inside a tar member (truncated file?); samples after the cut are lost"))


def _shard_items(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard, then one bad item naming the shard if it could not be read to its end.

    Only the first error is reported: later ones of a broken shard are its consequences.
    """
    errors: list[Exception] = []

    def keep_going(error: Exception) -> bool:
        errors.append(error)
        return True

    yield from _shard_samples(url, keep_going)
    if errors:
        first = errors[0]
        message = str(first.args[0]).split(" @ ")[0] if first.args else ""  # webdataset appends " @ <stream>"
        yield {"bad": (url, f"unreadable shard: {type(first).__name__}: {message}"), "index": -1}


def _shuffled(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer: emit a random buffered item as each new one arrives."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = rng.randrange(buffer_size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _take(items: Iterator[Any], count: int) -> Iterator[Any]:
    for _ in range(count):
        try:
            yield next(items)
        except StopIteration:
            return


def build_webdataset(
    cfg: DataSourceConfig,
    transform: Callable[[Image.Image], torch.Tensor],
    seed: int = 0,
    collate: Callable[[list[dict[str, Any]]], Any] | None = None,
    batch_size: int = 0,
    train: bool = True,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
) -> WebImageTextStream:
    """A ``WebImageTextStream`` over the shards ``cfg.path`` names (brace pattern, ``::`` lists).

    ``batch_size`` > 0 makes the stream yield ``collate(items)`` batches (default collator:
    ``Collator()`` without tokenizer); 0 yields single items. ``cfg.num_samples`` sets the
    epoch length (required with ``resampled``). Local shards must exist.
    """
    if not cfg.path:
        raise FileNotFoundError("data path is empty (config key 'path' of the webdataset data source)")
    if getattr(transform, "open_image", None) is not None:  # e.g. multispectral model.input
        raise ValueError(f"data source {cfg.path!r}: webdataset streams decode RGB images only, but the model "
                         f"reads its files with an image reader (model.input); use a manifest format (csv, folders...)")
    urls = expand_shard_pattern(cfg.path)
    missing = [url for url in urls if _is_local(url) and not os.path.isfile(url)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(
            f"data path {cfg.path!r} (config key 'path' of the webdataset data source): "
            f"{len(missing)} of {len(urls)} shards not found: {shown}"
        )
    return WebImageTextStream(
        urls, transform, seed=seed, train=train, collate=collate, batch_size=batch_size,
        shuffle_buffer=shuffle_buffer, num_samples=cfg.num_samples, resampled=resampled,
    )


# --- writing shards ---------------------------------------------------------------------------------
@dataclass
class ShardWriteResult:
    """What ``write_shards`` wrote.

    Attributes:
        shards: paths of the written tar files, in order.
        pattern: one string naming them all, for ``DataSourceConfig.path`` (brace pattern when
            the output pattern has one ``%d`` field, else the paths joined with ``::``).
        written: samples written.
        skipped: ``(image path, reason)`` for records that could not be written.
    """

    shards: list[str]
    pattern: str
    written: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _image_payload(path: str) -> tuple[str, bytes]:
    """(tar extension, bytes) for an image file: JPEG/PNG copied as is, other formats as PNG.

    JPEG and PNG files are not decoded (fast, lossless); a corrupt one is reported when read.
    """
    suffix = Path(path).suffix.lower()
    if suffix in (".jpg", ".jpeg", ".png"):
        with open(path, "rb") as handle:
            return ("png" if suffix == ".png" else "jpg"), handle.read()
    buffer = io.BytesIO()
    open_rgb_image(path).save(buffer, format="PNG")
    return "png", buffer.getvalue()


def _brace_pattern(out_pattern: str, count: int, shards: list[str]) -> str:
    fields = re.findall(r"%(0?)(\d*)d", out_pattern)
    if len(fields) != 1 or count == 0:
        return "::".join(shards)
    zero, width = fields[0]
    first, last = (f"%{zero}{width}d" % 0), (f"%{zero}{width}d" % (count - 1))
    return re.sub(r"%0?\d*d", lambda _: f"{{{first}..{last}}}" if count > 1 else first, out_pattern)


def write_shards(
    records: RecordSet | Sequence[ImageTextRecord], out_pattern: str, samples_per_shard: int = 1000
) -> ShardWriteResult:
    """Write records into tar shards named ``out_pattern % shard_number`` (e.g. ``out/train-%04d.tar``).

    Each sample gets key = the record's index (9 digits), the image, ``txt`` = captions one per
    line (newlines inside a caption become spaces) and ``cls`` when the record has a label.
    Missing or unreadable non-JPEG/PNG files are skipped and listed in the result.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
    try:
        out_pattern % 0
    except TypeError as error:
        raise ValueError(f"out_pattern {out_pattern!r} needs one integer field such as %04d for the shard number") from error
    record_list = list(records.records if isinstance(records, RecordSet) else records)
    shards: list[str] = []
    skipped: list[tuple[str, str]] = []
    writer: wds.TarWriter | None = None
    written = 0
    try:
        for index, record in enumerate(record_list):
            try:
                extension, payload = _image_payload(record.image)
            except FileNotFoundError:
                skipped.append((record.image, "file not found"))
                continue
            except (BadImageError, OSError) as error:
                skipped.append((record.image, str(getattr(error, "reason", error))))
                continue
            if written % samples_per_shard == 0:
                if writer is not None:
                    writer.close()
                    os.replace(shards[-1] + ".tmp", shards[-1])
                shards.append(out_pattern % len(shards))
                Path(shards[-1]).parent.mkdir(parents=True, exist_ok=True)
                writer = wds.TarWriter(shards[-1] + ".tmp", encoder=False, mtime=0)
            sample = {"__key__": f"{index:09d}", extension: payload,
                      "txt": "\n".join(" ".join(c.splitlines()) for c in record.captions).encode("utf-8")}
            if record.label >= 0:
                sample["cls"] = str(record.label).encode("utf-8")
            writer.write(sample)
            written += 1
    finally:
        if writer is not None:
            writer.close()
    if shards:
        os.replace(shards[-1] + ".tmp", shards[-1])
    return ShardWriteResult(shards, _brace_pattern(out_pattern, len(shards), shards), written, skipped)

"""DATA of ``domainclip index``: what to encode, listed without opening any image.

* a folder: every image file under it (recursively, sorted by path); the label is the name of
  the file's parent folder when the folder holds one sub-folder per class (``root/<class>/*.jpg``),
  else none; no captions.
* a manifest ``.csv`` / ``.jsonl`` / ``.parquet``: read by the kit's loaders (``image_key``,
  ``caption_key``, ``label_key``, ``caption_separator`` as in training). A CSV with neither a
  caption column nor ``label_key`` lists uncaptioned images. Otherwise training's rules hold
  (``core/data/sources.py``): with ``label_key`` and no caption column, the items get the label's
  template captions (``a photo of a {label}.``); a JSONL or Parquet manifest without its caption
  column and without ``label_key`` fails naming the column.
* webdataset shards ``.tar`` (brace patterns ``shards/{0000..0099}.tar``): every sample with an
  image member; captions from its ``txt`` member, a label from ``cls``. The image is read
  straight from the tar at its offset; its ``path`` is ``SHARD.tar#MEMBER``.

Rows that cannot become items (a manifest row without an image path, a file whose name is not
valid UTF-8) are listed as bad inputs. Compressed tar shards are refused (offsets into them are
not offsets into the file).
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..data.dataset import BadImageError, open_rgb_image
from ..data.sources import IMAGE_EXTENSIONS, DataSourceConfig, load_records
from ..data.webdataset import STREAM_IMAGE_KEYS, expand_shard_pattern

MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
DATA_OPTIONS = ("image_key", "caption_key", "label_key", "caption_separator")


@dataclass
class Item:
    """One image to encode: where it is, what describes it, and (tar members) where its bytes are."""

    path: str
    captions: list[str] = field(default_factory=list)
    label: str = ""
    label_index: int = -1
    span: tuple[int, int] | None = None  # (offset, size) inside a tar file


def list_items(data: str, options: dict[str, Any] | None = None) -> tuple[list[Item], list[tuple[str, str]]]:
    """``(items, skipped)`` of DATA (see the module docstring); ``skipped`` are ``(what, reason)``."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(DATA_OPTIONS))
    if unknown:
        raise ValueError(f"unknown data options {unknown}; valid: {list(DATA_OPTIONS)}")
    path = Path(data)
    if path.is_dir():
        return _folder_items(path)
    if data.lower().endswith(COMPRESSED_TAR_SUFFIXES):
        raise ValueError(f"data {data!r}: compressed tar shards cannot be indexed (images are read straight from "
                         f"the tar at their offset); decompress them first, e.g. gunzip, to plain .tar shards")
    if data.endswith(".tar"):
        return _tar_items(data), []
    if path.suffix.lower() in MANIFEST_FORMATS:
        return _manifest_items(path, options)
    if not path.exists():
        raise FileNotFoundError(f"data {data!r} does not exist")
    raise ValueError(f"data {data!r}: expected an image folder, a .csv/.jsonl/.parquet manifest or .tar shards")


def _folder_items(root: Path) -> tuple[list[Item], list[tuple[str, str]]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    # a name that is not valid UTF-8 cannot be stored in the metadata (nor sent by the service)
    skipped = [(os.fsencode(p).decode("utf-8", "backslashreplace"), "file name is not valid UTF-8; rename it")
               for p in files if not _is_utf8(str(p))]
    files = [p for p in files if _is_utf8(str(p))]
    class_folders = all(p.parent.parent == root for p in files)
    classes = sorted({p.parent.name for p in files}) if class_folders else []
    return [Item(str(p), label=p.parent.name if class_folders else "",
                 label_index=classes.index(p.parent.name) if class_folders else -1) for p in files], skipped


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _manifest_items(path: Path, options: dict[str, Any]) -> tuple[list[Item], list[tuple[str, str]]]:
    fmt = MANIFEST_FORMATS[path.suffix.lower()]
    cfg = DataSourceConfig(format=fmt, path=str(path), **{k: v for k, v in options.items() if v != ""})
    if fmt == "csv":
        import pandas as pd

        columns = list(pd.read_csv(path, nrows=0).columns)
    else:
        columns = None
    if columns is not None and cfg.caption_key not in columns and not cfg.label_key:
        if options.get("caption_key"):  # asked for by name: a misspelling must not drop every caption
            raise KeyError(f"{path}: no column {cfg.caption_key!r} (--caption-key); columns: {columns}")
        return _caption_free_csv(path, cfg, columns)
    records = load_records(cfg)
    names = records.class_names
    items = [Item(r.image, list(r.captions), names[r.label] if 0 <= r.label < len(names) else "", r.label)
             for r in records.records]
    return items, list(records.skipped)


def _caption_free_csv(path: Path, cfg: DataSourceConfig, columns: list[str]) -> tuple[list[Item], list[tuple[str, str]]]:
    """A CSV listing only images (no caption or label column): every row an uncaptioned item."""
    import pandas as pd

    if cfg.image_key not in columns:
        raise KeyError(f"{path}: no column {cfg.image_key!r} (columns: {columns}); set --image-key")
    items, skipped = [], []
    for row, value in enumerate(pd.read_csv(path, usecols=[cfg.image_key], dtype=str)[cfg.image_key]):
        if not isinstance(value, str) or not value.strip():
            skipped.append((f"{path}:row {row + 2}", f"empty {cfg.image_key!r}"))
            continue
        image = Path(value)
        items.append(Item(str(image if image.is_absolute() else path.parent / image)))
    return items, skipped


def _tar_items(pattern: str) -> list[Item]:
    urls = expand_shard_pattern(pattern)
    missing = [url for url in urls if not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(f"data {pattern!r}: {len(missing)} of {len(urls)} tar shards not found, e.g. {missing[0]}")
    items = []
    for url in urls:
        samples: dict[str, dict[str, Any]] = {}
        with tarfile.open(url) as archive:
            for member in archive:
                if not member.isfile() or "." not in Path(member.name).name:
                    continue
                key, ext = _split(member.name)
                sample = samples.setdefault(key, {})
                ext = ext.lower()
                if ext in STREAM_IMAGE_KEYS:
                    sample["image"] = member
                elif ext in ("txt", "cls"):
                    sample[ext] = archive.extractfile(member).read().decode("utf-8", "replace").strip()
        for key, sample in samples.items():
            member = sample.get("image")
            if member is None:
                continue
            captions = [line.strip() for line in sample.get("txt", "").split("\n") if line.strip()]
            label = sample.get("cls", "")
            items.append(Item(f"{url}#{member.name}", captions, label,
                              int(label) if label.lstrip("-").isdigit() else -1,
                              (member.offset_data, member.size)))
    if not items:
        raise FileNotFoundError(f"data {pattern!r}: the tar shards hold no images ({', '.join(STREAM_IMAGE_KEYS)})")
    return items


def _split(name: str) -> tuple[str, str]:
    """``dir/0001.txt`` -> (``dir/0001``, ``txt``): webdataset's key is everything before the file name's first dot."""
    folder, _, base = name.rpartition("/")
    key, ext = base.split(".", 1)
    return (f"{folder}/{key}" if folder else key), ext


def open_item(item: Item) -> Image.Image:
    """The item's image, decoded to RGB, or ``BadImageError`` with the reason."""
    if item.span is None:
        return open_rgb_image(item.path)
    tar_path = split_tar_path(item.path)[0]
    offset, size = item.span
    try:
        with open(tar_path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
    except OSError as error:
        raise BadImageError(f"cannot read {tar_path}: {error}") from None
    return open_rgb_image(io.BytesIO(data))


def split_tar_path(path: str) -> tuple[str, str]:
    """``SHARD.tar#MEMBER`` -> (``SHARD.tar``, ``MEMBER``): the first ``.tar#`` whose left side is a
    file (folders and member names may hold ``#`` too); ``(path, "")`` for a plain file."""
    start = 0
    while (found := path.find(".tar#", start)) >= 0:
        tar_path = path[:found + 4]
        if Path(tar_path).is_file():
            return tar_path, path[found + 5:]
        start = found + 1
    return path, ""


def open_indexed_path(path: str) -> Image.Image:
    """An image named by an index's metadata ``path`` (a file, or ``SHARD.tar#MEMBER``)."""
    tar_path, member = split_tar_path(path)
    if member:
        with tarfile.open(tar_path) as archive:
            try:
                data = archive.extractfile(member).read()
            except (KeyError, AttributeError):
                raise BadImageError(f"{member} is not in {tar_path}") from None
        return open_rgb_image(io.BytesIO(data))
    return open_rgb_image(path)


class ItemDataset(torch.utils.data.Dataset):
    """Items -> ``{"image", "index"}`` (or ``{"bad", "index"}``) for a DataLoader with ``Collator``."""

    def __init__(self, items: list[Item], transform, start: int = 0):
        self.items, self.transform, self.start = items, transform, start

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            image = open_item(item)
            tensor = self.transform(image)
        except BadImageError as error:
            return {"bad": (item.path, error.reason), "index": self.start + index}
        return {"image": tensor, "caption": "", "label": 0, "index": self.start + index}

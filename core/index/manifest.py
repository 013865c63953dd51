"""``manifest.json`` of an index folder: the model it is pinned to, its sources and its FAISS index.

Written atomically (temporary file + fsync + rename) before encoding starts and after every
change, so a killed ``domainclip index`` knows on its next run what it was doing. Searching or
adding with a model whose weights hash differs is refused (:class:`ModelMismatchError`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import atomic_write_text

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
DTYPES = ("float32", "float16")


class ModelMismatchError(ValueError):
    """The index was built with other weights (or preprocessing) than the model given."""


@dataclass
class SourceEntry:
    """One DATA argument encoded into the index (the first one, then one per ``--add``).

    Attributes:
        data: the DATA argument as given (resolved to an absolute path when local).
        options: the data options (format, keys) used to read it.
        first_shard: number of its first shard; its shards are ``first_shard .. first_shard + num_shards - 1``.
        num_shards: shards it is split into.
        total: items it lists (good and unreadable), the rows that could not become items included.
        complete: every shard is written.
        skipped: ``[path, reason]`` of the rows that could not become items (a manifest row without
            an image path); they are counted and listed in ``bad_inputs.json`` with the unreadable images.
        precision: the precision its images were encoded in (``--add`` may use another one; a
            resumed run must use the same); "" in indexes made before it was recorded.
    """

    data: str
    options: dict[str, Any]
    first_shard: int
    num_shards: int
    total: int
    complete: bool = False
    skipped: list[list[str]] = field(default_factory=list)
    precision: str = ""


@dataclass
class IndexManifest:
    """What an index folder holds and how it was made (see the module docstring)."""

    model: dict[str, Any]
    dtype: str = "float32"
    shard_size: int = 4096
    sources: list[SourceEntry] = field(default_factory=list)
    count: int = 0
    bad: int = 0
    faiss: dict[str, Any] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "IndexManifest":
        saved = dict(saved)
        if saved.get("version") != FORMAT_VERSION:
            raise ValueError(f"index manifest version {saved.get('version')!r} is not supported (expected {FORMAT_VERSION})")
        saved["sources"] = [SourceEntry(**entry) for entry in saved.get("sources", [])]
        return cls(**saved)

    def check_model(self, fingerprint: dict[str, Any], folder: str | Path) -> None:
        """Raise :class:`ModelMismatchError` unless ``fingerprint`` has this index's weights and preprocessing."""
        pinned = self.model
        if fingerprint["sha256"] != pinned["sha256"]:
            raise ModelMismatchError(
                f"index {folder} was built with model {pinned.get('source')!r} (weights sha256 {pinned['sha256'][:16]}...), "
                f"but the model given, {fingerprint.get('source')!r}, has weights sha256 {fingerprint['sha256'][:16]}...; "
                f"its embeddings are not comparable. Use the model that built the index, or build a new index "
                f"with `domainclip index`.")
        if fingerprint["preprocess"] != pinned["preprocess"]:
            raise ModelMismatchError(
                f"index {folder} was built with preprocessing {pinned['preprocess']}, but the model given uses "
                f"{fingerprint['preprocess']}; build a new index with this preprocessing")


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST_FILE


def read_manifest(folder: str | Path) -> IndexManifest:
    """The manifest of index ``folder``; a folder without one is not an index."""
    path = manifest_path(folder)
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a domainclip index: {MANIFEST_FILE} is missing "
                                f"(build one with `domainclip index MODEL DATA --out {folder}`)")
    try:
        return IndexManifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"{path} is not a valid index manifest: {error}") from None


def write_manifest(folder: str | Path, manifest: IndexManifest) -> None:
    """Write ``manifest.json`` atomically."""
    atomic_write_text(manifest_path(folder), json.dumps(manifest.to_dict(), indent=2) + "\n")

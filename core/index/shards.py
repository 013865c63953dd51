"""Embedding shards of an index folder, each committed atomically.

Shard ``n`` is three files under ``shards/``: ``emb-n.npy`` (the good items' embeddings, float32
or float16), ``meta-n.parquet`` (path, captions, label of those items, same order) and, written
last, ``shard-n.json`` (counts, the unreadable items with their reasons, and the SHA-256 of the
two data files). Each file goes through temporary file + fsync + rename; a shard exists only
once its JSON does and the hashes match, so a run killed at any point redoes at most the shard
it was writing. Items of a shard are always encoded in the same batches, so a redone shard is
byte-identical to the one an uninterrupted run writes.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..checkpoint import atomic_write_bytes, atomic_write_text
from ..train.checkpointing import fault_point

SHARD_DIR = "shards"
META_SCHEMA = pa.schema([("path", pa.string()), ("captions", pa.list_(pa.string())), ("label", pa.string()),
                         ("label_index", pa.int64()), ("position", pa.int64()), ("source", pa.int64())])


@dataclass
class Shard:
    """One committed shard read back."""

    number: int
    embeddings: np.ndarray
    metadata: pa.Table
    bad: list[tuple[str, str]]
    total: int


def _name(kind: str, number: int, suffix: str) -> str:
    return f"{kind}-{number:06d}.{suffix}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_shard(folder: Path, number: int, embeddings: np.ndarray, rows: list[dict[str, Any]],
                bad: list[tuple[str, str]], dtype: str) -> None:
    """Commit shard ``number``: ``embeddings`` (N, D) of the ``rows`` (N metadata dicts) plus its ``bad`` items."""
    if len(rows) != len(embeddings):
        raise ValueError(f"shard {number}: {len(embeddings)} embeddings for {len(rows)} metadata rows")
    root = Path(folder) / SHARD_DIR
    root.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(embeddings, dtype=np.dtype(dtype)), allow_pickle=False)
    emb_bytes = buffer.getvalue()
    atomic_write_bytes(root / _name("emb", number, "npy"), emb_bytes)
    fault_point("index_mid_shard", number)
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=META_SCHEMA), buffer)
    meta_bytes = buffer.getvalue()
    atomic_write_bytes(root / _name("meta", number, "parquet"), meta_bytes)
    record = {"number": number, "count": len(rows), "total": len(rows) + len(bad),
              "bad": [{"path": path, "reason": reason} for path, reason in bad],
              "emb_sha256": _sha256(emb_bytes), "meta_sha256": _sha256(meta_bytes)}
    atomic_write_text(root / _name("shard", number, "json"), json.dumps(record, indent=1) + "\n")
    fault_point("index_shard", number)


def _record(folder: Path, number: int) -> dict[str, Any] | None:
    path = Path(folder) / SHARD_DIR / _name("shard", number, "json")
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_committed(folder: Path, number: int) -> bool:
    """Shard ``number`` was fully written (its JSON exists and both data files match their hashes)."""
    record = _record(folder, number)
    if record is None:
        return False
    root = Path(folder) / SHARD_DIR
    for kind, suffix, key in (("emb", "npy", "emb_sha256"), ("meta", "parquet", "meta_sha256")):
        path = root / _name(kind, number, suffix)
        if not path.is_file() or _sha256(path.read_bytes()) != record[key]:
            return False
    return True


def shard_bad_items(folder: Path, number: int) -> tuple[list[tuple[str, str]], int]:
    """``(bad items, total items)`` of a committed shard, without reading its embeddings."""
    record = _record(folder, number)
    if record is None:
        raise FileNotFoundError(f"shard {number} of index {folder} is not written")
    return [(item["path"], item["reason"]) for item in record["bad"]], int(record["total"])


def read_shard(folder: Path, number: int) -> Shard:
    """Shard ``number`` (embeddings as stored, metadata table, bad items)."""
    record = _record(folder, number)
    if record is None:
        raise FileNotFoundError(f"shard {number} of index {folder} is not written (resume `domainclip index`)")
    root = Path(folder) / SHARD_DIR
    embeddings = np.load(root / _name("emb", number, "npy"), allow_pickle=False)
    metadata = pq.read_table(root / _name("meta", number, "parquet"))
    bad = [(item["path"], item["reason"]) for item in record["bad"]]
    return Shard(number, embeddings, metadata, bad, int(record["total"]))

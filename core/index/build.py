"""``domainclip index``: encode DATA with MODEL into an index folder, resumably, in bounded memory.

Layout of the folder::

    manifest.json      model pin (weights sha256, preprocessing), sources, counts, FAISS settings
    shards/            emb-N.npy + meta-N.parquet + shard-N.json, one committed shard per N items
    metadata.parquet   one row per indexed image (row i = FAISS id i): path, captions, label, ...
    index.faiss        the search index (flat or hnsw, see faiss_index.py)
    bad_inputs.json    the unreadable images with their reasons (as training's bad_inputs.json)
    index.lock         while an ``index`` process writes the folder (one writer at a time)

Streaming: items are listed (paths only), then encoded one shard at a time through a DataLoader
(``workers`` processes decode and resize); a shard's embeddings are written and dropped before
the next starts, so memory holds one shard of embeddings plus the FAISS index being built.
Re-running the same command after a kill continues at the first shard not committed and ends
with the same files as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from ..data.bad_inputs import BadInputReport
from ..data.dataset import Collator
from ..folder_lock import FolderLock
from . import faiss_index
from .encoding import Encoder
from .items import Item, ItemDataset, list_items
from .manifest import DTYPES, IndexManifest, SourceEntry, read_manifest, manifest_path, write_manifest
from .shards import META_SCHEMA, SHARD_DIR, is_committed, read_shard, shard_bad_items, write_shard

METADATA_FILE = "metadata.parquet"
BAD_INPUTS_FILE = "bad_inputs.json"
LOCK_FILE = "index.lock"  # while an index process writes the folder: its pid, host and start time
DEFAULT_SHARD_SIZE = 4096
MAX_BAD_OPTION = "--max-bad-fraction"


@dataclass
class IndexOptions:
    """How ``build_index`` encodes (see ``domainclip index --help``).

    ``shard_size`` and ``dtype`` belong to the index: None takes 4096 / ``float32`` for a new one
    and the index's own when resuming or adding; a given value other than the index's is an error.
    """

    batch_size: int = 64
    workers: int = 0
    shard_size: int | None = None
    dtype: str | None = None
    kind: str = "auto"
    max_bad_fraction: float = 0.01
    progress: bool = True


def build_index(encoder: Encoder, data: str, out: str | Path, options: IndexOptions | None = None,
                data_options: dict[str, Any] | None = None, add: bool = False) -> dict[str, Any]:
    """Encode ``data`` into index folder ``out`` (new, resumed, or with ``add`` extended); returns a summary."""
    options = options or IndexOptions()
    _check_options(options)
    out = Path(out)
    data = _absolute(data)
    fingerprint = encoder.fingerprint()
    with _writer_lock(out):
        manifest, source_number = _open_or_start(out, data, data_options or {}, fingerprint, options, add)
        source = manifest.sources[source_number]
        if not source.complete:
            items, skipped = list_items(source.data, source.options)
            if len(items) + len(skipped) != source.total:
                raise ValueError(f"data {source.data} now lists {len(items) + len(skipped)} items, but the "
                                 f"interrupted index run listed {source.total}; it changed since. Remove {out} "
                                 "and index again.")
            _encode_source(encoder, out, manifest, source_number, items, skipped, options)
            source.complete = True
            write_manifest(out, manifest)
        return finish_index(out, manifest, options.kind)


@contextlib.contextmanager
def _writer_lock(out: Path) -> Iterator[None]:
    """One ``index`` process per folder: two writing the same shards and manifest would corrupt
    both. A folder this call created is removed again if nothing but the lock was written."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out / LOCK_FILE, "index", "wait for it or stop it (a killed run's lock is taken over), "
                      "or index into another --out folder")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
        if created and not any(out.iterdir()):
            out.rmdir()


def _check_options(options: IndexOptions) -> None:
    if options.dtype is not None and options.dtype not in DTYPES:
        raise ValueError(f"dtype {options.dtype!r} is not supported; valid: {', '.join(DTYPES)}")
    for name in ("batch_size", "shard_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if options.shard_size is not None:
        _check_batches(options.shard_size, options.batch_size)
    faiss_index.choose_kind(0, options.kind)


def _check_batches(shard_size: int, batch_size: int) -> None:
    if shard_size % batch_size:
        raise ValueError(f"shard_size ({shard_size}) must be a multiple of batch_size ({batch_size}) "
                         "so that every shard is encoded in the same batches")


def _check_kept(out: Path, manifest: IndexManifest, options: IndexOptions) -> None:
    """A resumed or extended index keeps its shard size and stored dtype."""
    if options.shard_size is not None and options.shard_size != manifest.shard_size:
        raise ValueError(f"{out} is written in shards of {manifest.shard_size} images; --shard-size "
                         f"{options.shard_size} cannot change it (leave --shard-size out)")
    if options.dtype is not None and options.dtype != manifest.dtype:
        raise ValueError(f"{out} stores {manifest.dtype} embeddings; --dtype {options.dtype} cannot be added to it "
                         "(leave --dtype out)")
    _check_batches(manifest.shard_size, options.batch_size)


def _absolute(data: str) -> str:
    """A local DATA as one absolute path (``..`` collapsed): the same data always names the same source."""
    return data if "://" in data or data.startswith("pipe:") else os.path.abspath(Path(data).expanduser())


def _open_or_start(out: Path, data: str, data_options: dict[str, Any], fingerprint: dict[str, Any],
                   options: IndexOptions, add: bool) -> tuple[IndexManifest, int]:
    """The manifest to work on and the number of the source ``data`` is in it."""
    if manifest_path(out).is_file():
        manifest = read_manifest(out)
        manifest.check_model(fingerprint, out)
        _check_kept(out, manifest, options)
        for number, source in enumerate(manifest.sources):
            if _absolute(source.data) == data and source.options == data_options:
                if not source.complete and source.precision and source.precision != fingerprint["precision"]:
                    raise ValueError(f"{out}: the interrupted run encoded {data} in {source.precision}; resume it "
                                     f"with --precision {source.precision} (this run resolves to "
                                     f"{fingerprint['precision']}), so one source is not encoded in two precisions")
                return manifest, number  # resume (or nothing left to do)
        if not add:
            raise FileExistsError(f"{out} already holds an index of {manifest.sources[0].data}; use --add to add "
                                  f"{data} to it, or choose a new --out folder")
        unfinished = [s.data for s in manifest.sources if not s.complete]
        if unfinished:
            raise ValueError(f"{out}: the run indexing {unfinished[0]} was interrupted; re-run that command first")
    else:
        if add:
            raise FileNotFoundError(f"--add: {out} is not an index yet (no manifest.json); build it without --add first")
        if any(path.name != LOCK_FILE for path in out.iterdir()):
            raise FileExistsError(f"--out {out} exists and is not an index; give a new or empty folder")
        out.mkdir(parents=True, exist_ok=True)
        manifest = IndexManifest(model=fingerprint, dtype=options.dtype or "float32",
                                 shard_size=options.shard_size or DEFAULT_SHARD_SIZE)
        _check_batches(manifest.shard_size, options.batch_size)
    items, skipped = list_items(data, data_options)
    first = sum(s.num_shards for s in manifest.sources)
    manifest.sources.append(SourceEntry(data=data, options=data_options, first_shard=first,
                                        num_shards=math.ceil(len(items) / manifest.shard_size),
                                        total=len(items) + len(skipped), precision=fingerprint["precision"],
                                        skipped=[[path, reason] for path, reason in skipped]))
    write_manifest(out, manifest)
    return manifest, len(manifest.sources) - 1


def _encode_source(encoder: Encoder, out: Path, manifest: IndexManifest, source_number: int, items: list[Item],
                   skipped: list[tuple[str, str]], options: IndexOptions) -> None:
    source = manifest.sources[source_number]
    size = manifest.shard_size
    report = BadInputReport.from_items(skipped, seen=len(skipped), total=source.total)
    bar = tqdm(total=len(items), unit="img", desc=f"index {Path(source.data).name}", disable=not options.progress)
    for part in range(source.num_shards):
        number = source.first_shard + part
        chunk = items[part * size:(part + 1) * size]
        if not is_committed(out, number):
            _encode_shard(encoder, out, number, chunk, part * size, source_number, manifest.dtype, options)
        bad, total = shard_bad_items(out, number)
        report.add_seen(total)
        for path, reason in bad:
            report.add_bad(path, reason)
        report.check(options.max_bad_fraction, key=MAX_BAD_OPTION)
        bar.update(len(chunk))
    bar.close()
    report.check(options.max_bad_fraction, key=MAX_BAD_OPTION)  # a source with no items has no shards


def _encode_shard(encoder: Encoder, out: Path, number: int, chunk: list[Item], start: int, source_number: int,
                  dtype: str, options: IndexOptions) -> None:
    loader = torch.utils.data.DataLoader(
        ItemDataset(chunk, encoder.transform, start), batch_size=options.batch_size, shuffle=False,
        num_workers=options.workers, collate_fn=Collator(image_shape=encoder.image_shape))
    parts, rows, bad = [], [], []
    for batch in loader:
        bad.extend(batch["bad"])
        if batch["images"].shape[0] == 0:
            continue
        parts.append(encoder.encode_batch(batch["images"]))
        for position in batch["indices"].tolist():
            item = chunk[position - start]
            rows.append({"path": item.path, "captions": item.captions, "label": item.label,
                         "label_index": item.label_index, "position": position, "source": source_number})
    dim = encoder.fingerprint()["embed_dim"]
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    write_shard(out, number, embeddings, rows, bad, dtype)


def finish_index(out: Path, manifest: IndexManifest, kind: str = "auto") -> dict[str, Any]:
    """Build ``index.faiss``, ``metadata.parquet`` and ``bad_inputs.json`` from the committed shards.

    An existing FAISS index of the same kind that holds the first vectors is extended with the
    new shards only (``--add``); otherwise it is rebuilt, streaming shard by shard.
    """
    shard_count = sum(s.num_shards for s in manifest.sources)
    counts = [shard_bad_items(out, n) for n in range(shard_count)]
    total_good = sum(total - len(bad) for bad, total in counts)
    requested = kind if kind != "auto" else manifest.faiss.get("requested", "auto")  # --add keeps the first choice
    chosen = faiss_index.choose_kind(total_good, requested)
    previous = manifest.faiss if (out / faiss_index.INDEX_FILE).is_file() else {}
    index, start_shard, count = None, 0, 0
    if previous.get("kind") == chosen and previous.get("shards", 0) <= shard_count and previous.get("count", -1) >= 0:
        index = faiss_index.load_index(out)
        if index.ntotal == previous["count"]:
            start_shard, count = previous["shards"], previous["count"]
        else:
            index = None
    if index is None:
        index = faiss_index.new_index(chosen, int(manifest.model["embed_dim"]), manifest.dtype)
    report = BadInputReport(total=sum(source.total for source in manifest.sources))
    for source in manifest.sources:  # rows that never became items: counted and listed too
        report.add_seen(len(source.skipped))
        for path, reason in source.skipped:
            report.add_bad(path, reason)
    temporary = out / f".{METADATA_FILE}.tmp"
    writer = pq.ParquetWriter(temporary, META_SCHEMA.insert(0, pa.field("id", pa.int64())))
    next_id = 0
    try:
        for number in range(shard_count):
            shard = read_shard(out, number)
            report.add_seen(shard.total)
            for path, reason in shard.bad:
                report.add_bad(path, reason)
            ids = pa.array(np.arange(next_id, next_id + len(shard.metadata), dtype=np.int64))
            writer.write_table(shard.metadata.add_column(0, "id", ids))
            next_id += len(shard.metadata)
            if number >= start_shard:
                faiss_index.add_vectors(index, shard.embeddings)
                count += len(shard.embeddings)
    finally:
        writer.close()
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    if index.ntotal != next_id:
        raise RuntimeError(f"{out}: the FAISS index holds {index.ntotal} vectors but the shards {next_id}")
    temporary.replace(out / METADATA_FILE)
    faiss_index.save_index(index, out)
    report.write_json(out / BAD_INPUTS_FILE)
    manifest.count, manifest.bad = int(index.ntotal), report.bad
    manifest.faiss = {**faiss_index.describe_index(chosen), "requested": requested, "shards": shard_count, "count": int(index.ntotal)}
    write_manifest(out, manifest)
    return {"index": str(out), "count": manifest.count, "bad": manifest.bad, "kind": chosen,
            "dim": int(manifest.model["embed_dim"]), "sources": [s.data for s in manifest.sources]}

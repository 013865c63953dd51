"""Result records in CLIP_benchmark's JSON layout and the run's ``metrics.json``.

One record is ``{"dataset", "model", "pretrained", "task", "metrics", "language"}`` like the
files ``clip_benchmark eval`` writes, so its ``build`` step and the usual spreadsheets can read
ours. A run's ``metrics.json`` is a list of such records.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["RECORD_KEYS", "benchmark_json", "read_metrics", "to_json_value", "write_metrics"]

RECORD_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")
OPTIONAL_KEYS = ("retention", "classifier", "step", "precision", "token_merging")
"""Kept when present: the change against the base model, a note on the classifier used, the step,
the precision the weights were held in while encoding (``fp32`` / ``bf16`` / ``fp16``)."""


def benchmark_json(
    task: str, metrics: Mapping[str, Any], dataset: str, model: str, pretrained: str = "", language: str = "en"
) -> dict[str, Any]:
    """One CLIP_benchmark-style record, with ``metrics`` made JSON-safe (see ``to_json_value``).

    ``task`` is e.g. ``"zeroshot_classification"``, ``"zeroshot_retrieval"`` or
    ``"zeroshot_multilabel"``; ``pretrained`` names the weights (a tag or a checkpoint path).
    """
    for name, value in (("task", task), ("dataset", dataset), ("model", model)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"benchmark_json: {name} must be a non-empty string, got {value!r}")
    for name, value in (("pretrained", pretrained), ("language", language)):
        if not isinstance(value, str):
            raise ValueError(f"benchmark_json: {name} must be a string, got {value!r}")
    if not isinstance(metrics, Mapping):
        raise ValueError(f"benchmark_json: metrics must be a dict, got {type(metrics).__name__}")
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": to_json_value(metrics),
        "language": language,
    }


def to_json_value(value: Any) -> Any:
    """``value`` with tensors, numpy values and tuples turned into JSON types; NaN and inf become None.

    Strict JSON has no NaN, and an undefined metric (e.g. an AUROC without positives) is
    written as ``null`` rather than as a number it is not.
    """
    if isinstance(value, Mapping):
        return {str(key): to_json_value(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return to_json_value(value.detach().cpu().tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        return to_json_value(value.tolist())
    if isinstance(value, (list, tuple)):
        return [to_json_value(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write a {type(value).__name__} ({value!r}) to JSON")


def write_metrics(path: str | os.PathLike[str], results: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``results`` (records from ``benchmark_json``) to ``path`` atomically.

    The JSON goes to a temporary file in the same folder, is flushed to disk and then renamed
    over ``path``, so a reader never sees a half-written file and a crash keeps the old one.
    """
    path = Path(path)
    if isinstance(results, Mapping):
        raise ValueError("write_metrics takes a list of records; wrap a single record in a list")
    records = []
    for number, record in enumerate(results):
        if not isinstance(record, Mapping):
            raise ValueError(f"write_metrics: result {number} is a {type(record).__name__}, not a record dict")
        missing = [key for key in RECORD_KEYS if key not in record]
        if missing:
            raise ValueError(f"write_metrics: result {number} lacks keys {missing}; build it with benchmark_json")
        records.append({key: to_json_value(record[key]) for key in (*RECORD_KEYS, *OPTIONAL_KEYS) if key in record})
    text = json.dumps(records, indent=2, allow_nan=False) + "\n"

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); keep an existing file's mode, else rw-r--r--
        os.fchmod(descriptor, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``metrics.json`` written by ``write_metrics``."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        try:
            records = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error}); expected the list of result records that "
                             "domainclip eval writes (run it again to rewrite the file)") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of result records, got {type(records).__name__}")
    return records

"""Printable forms of zero-shot results (the ``domainclip classify`` output): JSON and CSV."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

from .classifier import ZeroShotResult, check_labels, results_to_rows

FORMATS = ("json", "csv")
CSV_COLUMNS = ("image", "rank", "label", "probability")


def format_results(results: Sequence[ZeroShotResult], fmt: str = "json") -> str:
    """``json``: a list of ``{"image", "predictions": [{"label", "probability"}, ...]}``;
    ``csv``: one row per (image, rank) with columns image, rank, label, probability."""
    if fmt == "json":
        return json.dumps([result.to_dict() for result in results], indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(results_to_rows(results))
        return buffer.getvalue()
    raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")


def parse_labels(text: str) -> list[str]:
    """``"a,b,c"`` -> ``["a", "b", "c"]`` (spaces around commas dropped; blank entries are errors)."""
    return check_labels([part for part in text.split(",")] if text.strip() else [])

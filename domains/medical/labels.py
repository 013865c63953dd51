"""CheXpert / MIMIC-CXR label CSVs (1 / 0 / -1 / blank) into multi-label targets.

Cell values: ``1`` positive, ``0`` negative, ``-1`` uncertain ("may represent..."), blank = the
report does not mention it. The uncertainty policy decides what ``-1`` becomes (Irvin et al.,
2019): ``ones`` (U-Ones: positive), ``zeros`` (U-Zeros: negative) or ``ignore`` (unknown: NaN,
left out of that label's loss / AUROC). Blank cells become ``blank`` (``zeros`` by default, the
CheXpert convention; ``ignore`` for NaN). Any other value is an error naming file, line, column.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from domainclip.core.data.sources import read_csv_rows

from .prompts import CHEXPERT_COLUMNS

POLICIES = ("ones", "zeros", "ignore")
_POLICY_VALUE = {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}
_CELL = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": None}


@dataclass
class LabelTable:
    """Image paths (as written in the CSV) and their targets ``(N, L)`` float32 of 0 / 1 / NaN."""

    images: list[str]
    targets: np.ndarray
    findings: list[str]
    rows: list[dict[str, str]]


def check_policy(name: str, value: str) -> str:
    if value not in POLICIES:
        raise ValueError(f"{name} must be one of {POLICIES}, got {value!r}")
    return value


def cell_target(cell: str, uncertain: str, blank: str, where: str) -> float:
    """One CSV cell under the policies (see the module docstring)."""
    text = str(cell).strip()
    if text not in _CELL:
        raise ValueError(f"{where}: label value {cell!r} is not 1, 0, -1 or blank")
    value = _CELL[text]
    if value is None:
        return _POLICY_VALUE[blank]
    return _POLICY_VALUE[uncertain] if value == -1.0 else value


def read_label_csv(path: str | Path, findings: list[str] | None = None, uncertain: str = "ones",
                   blank: str = "zeros", image_key: str = "Path") -> LabelTable:
    """Read a CheXpert-layout CSV into a :class:`LabelTable` (``findings`` default: every CheXpert
    column the file has)."""
    check_policy("uncertainty policy", uncertain)
    check_policy("blank policy", blank)
    if blank == "ones":
        raise ValueError("blank policy 'ones' would call every unmentioned finding positive; use zeros or ignore")
    path = Path(path)
    rows, names, columns = read_csv_rows(path)
    if image_key not in columns:
        raise KeyError(f"image column {image_key!r} not found in {path}; columns present: {columns}")
    if findings is None:
        findings = [c for c in CHEXPERT_COLUMNS if c in columns]
        if not findings:
            raise ValueError(f"{path} has none of the CheXpert label columns {CHEXPERT_COLUMNS}")
    missing = [f for f in findings if f not in columns]
    if missing:
        raise KeyError(f"label column(s) {missing} not found in {path}; columns present: {columns}")
    targets = np.array([[cell_target(row[f], uncertain, blank, f"{name} column {f!r}") for f in findings]
                        for row, name in zip(rows, names)], dtype=np.float32).reshape(len(rows), len(findings))
    return LabelTable([row[image_key] for row in rows], targets, list(findings), rows)

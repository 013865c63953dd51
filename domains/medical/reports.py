"""Radiology reports: FINDINGS / IMPRESSION sections as captions, de-identification marks handled.

:func:`parse_report` splits free text at section headers (``FINDINGS:``, ``IMPRESSION:``,
``CONCLUSION:`` counts as impression, ``INDICATION:``, ``COMPARISON:``, ``TECHNIQUE:``,
``HISTORY:``; case-insensitive, at a line start or after a sentence). De-identification marks are
the placeholders that replaced protected words in released reports: ``XXXX`` (OpenI / IU X-ray),
``___`` (MIMIC-CXR) and ``[** ... **]`` (MIMIC-II). :func:`clean_text` handles them by
``deid_policy``:

* ``drop`` (default): remove every sentence that holds a mark (its meaning is unknown, e.g.
  "There are no XXXX of a pleural effusion");
* ``mask``: replace each mark by the neutral word ``[redacted]`` and keep the sentence;
* ``keep``: leave the text as it is.

List numbering ("1. ", "2. ") and doubled punctuation are removed; whitespace is collapsed.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from domainclip.core.data.sources import read_csv_rows

DEID_PATTERN = re.compile(r"X{2,}|_{2,}|\[\*\*.*?\*\*\]")
DEID_POLICIES = ("drop", "mask", "keep")
SECTION_ALIASES = {
    "findings": "findings", "finding": "findings", "impression": "impression", "impressions": "impression",
    "conclusion": "impression", "conclusions": "impression", "indication": "indication",
    "indications": "indication", "history": "indication", "clinical history": "indication",
    "comparison": "comparison", "comparisons": "comparison", "technique": "technique",
}
_HEADER = re.compile(r"(?:^|(?<=[\s.]))(" + "|".join(sorted(map(re.escape, SECTION_ALIASES), key=len, reverse=True))
                     + r")\s*:", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)")
_NUMBERING = re.compile(r"(?:^|(?<=\s))\d{1,2}[.)]\s+(?=[A-Za-z])")


@dataclass
class Report:
    """A report's sections (cleaned text, ``""`` when absent); ``other`` is text before any header."""

    findings: str = ""
    impression: str = ""
    sections: dict[str, str] = field(default_factory=dict)
    other: str = ""

    def captions(self, order: Iterable[str] = ("impression", "findings")) -> list[str]:
        """The non-empty sections in ``order`` (impression first: it is short and fits 77 tokens)."""
        texts = [self.findings if name == "findings" else self.impression if name == "impression"
                 else self.sections.get(name, "") for name in order]
        return [text for text in texts if text]


def check_deid_policy(policy: str) -> str:
    if policy not in DEID_POLICIES:
        raise ValueError(f"deid_policy must be one of {DEID_POLICIES}, got {policy!r}")
    return policy


def clean_text(text: str | None, deid_policy: str = "drop") -> str:
    """Normalise one section (see the module docstring for ``deid_policy``)."""
    check_deid_policy(deid_policy)
    if not text or not str(text).strip():
        return ""
    text = _NUMBERING.sub("", " ".join(str(text).split()))
    if deid_policy == "drop":
        text = " ".join(s for s in _SENTENCE.split(text) if not DEID_PATTERN.search(s))
    elif deid_policy == "mask":
        text = DEID_PATTERN.sub("[redacted]", text)
    text = re.sub(r"\.{2,}", ".", text)
    return " ".join(text.split())


def parse_report(text: str, deid_policy: str = "drop") -> Report:
    """Split a free-text report into sections and clean each (``clean_text``)."""
    check_deid_policy(deid_policy)
    text = str(text or "")
    matches = list(_HEADER.finditer(text))
    report = Report(other=clean_text(text[: matches[0].start()] if matches else text, deid_policy))
    for position, match in enumerate(matches):
        end = matches[position + 1].start() if position + 1 < len(matches) else len(text)
        name = SECTION_ALIASES[match.group(1).lower()]
        body = clean_text(text[match.end():end], deid_policy)
        if body:
            report.sections[name] = f"{report.sections[name]} {body}".strip() if name in report.sections else body
    report.findings = report.sections.get("findings", "")
    report.impression = report.sections.get("impression", "")
    return report


def report_from_columns(findings: str | None, impression: str | None, deid_policy: str = "drop") -> Report:
    """A report whose sections are already separate columns (IU X-ray ``reports.csv``).

    Each column is cleaned as a whole (``clean_text``) and never split again at header words: a
    column such as ``"Chest  Comparison: There is ..."`` stays the findings, all of it.
    """
    report = Report(findings=clean_text(findings, deid_policy), impression=clean_text(impression, deid_policy))
    report.sections = {name: text for name, text in (("findings", report.findings), ("impression", report.impression))
                       if text}
    return report


def section_counts(reports: Iterable[Report]) -> dict[str, int]:
    """How many reports have findings, impression, both, neither (after cleaning)."""
    counts: Counter[str] = Counter()
    for report in reports:
        counts["reports"] += 1
        has_f, has_i = bool(report.findings), bool(report.impression)
        counts["findings"] += has_f
        counts["impression"] += has_i
        counts["both"] += has_f and has_i
        counts["neither"] += not (has_f or has_i)
    return {key: counts[key] for key in ("reports", "findings", "impression", "both", "neither")}


def read_iu_reports(path: str | Path, deid_policy: str = "drop") -> list[tuple[dict[str, str], Report]]:
    """The rows of an IU X-ray ``reports.csv`` (report_id, image_path, findings, impression, ...)
    with their reports (``report_from_columns``: each column cleaned, not re-split)."""
    rows, _, columns = read_csv_rows(Path(path))
    missing = [c for c in ("findings", "impression") if c not in columns]
    if missing:
        raise KeyError(f"column(s) {missing} not found in {path}; columns present: {columns}")
    return [(row, report_from_columns(row["findings"], row["impression"], deid_policy)) for row in rows]

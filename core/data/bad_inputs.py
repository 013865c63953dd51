"""Count and list the data items that could not be used, and stop when there are too many.

Unreadable images are skipped rather than crashing a long run, but never silently: every
skipped item lands here with its reason, the run writes the list next to its outputs, and
``check`` stops training once the bad fraction passes ``data.max_bad_fraction``.

Counting rules (chosen so that the fraction means "share of the data set that is broken"):

* Bad items are listed once per path: an image that fails in every epoch is one bad image.
  ``occurrences`` still counts every failure, for diagnostics.
* ``seen`` counts every item delivered, good or bad, every epoch.
* When the data set's length is known (``total``) the fraction is unique bad paths / total.
  For a stream (no length) it is unique bad paths / seen, and ``check`` only judges it once at
  least ``MIN_SEEN_FOR_STREAM`` (100) items were seen, so two bad images among the first three
  do not stop a run.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError

MIN_SEEN_FOR_STREAM = 100
CONFIG_KEY = "data.max_bad_fraction"


class TooManyBadInputsError(UserError, RuntimeError):
    """More of the data set is unreadable than ``data.max_bad_fraction`` allows."""


def check_paths_exist(paths: list[str], max_fraction: float, where: str, root: str, root_key: str) -> int:
    """Stop before training when more than ``max_fraction`` of the local image ``paths`` do not exist.

    A wrong ``image_root`` makes every path miss; the run would otherwise start, write its folder
    and stop at the first batches. ``where`` names the data source (``data.train (train.csv)``),
    ``root`` the folder relative paths started from and ``root_key`` the key that sets it.
    Returns how many paths are missing (URLs and archive members are not checked).
    """
    local = [p for p in paths if "://" not in p and "::" not in p]
    missing = [p for p in local if not os.path.exists(p)]
    if not local or len(missing) / len(local) <= max_fraction:
        return len(missing)
    raise TooManyBadInputsError(
        f"{len(missing)} of {len(local)} image paths of {where} do not exist, e.g. {missing[0]}; relative paths "
        f"start at {root}: set {root_key} to the folder they are relative to (or fix the paths); "
        f"{CONFIG_KEY}={max_fraction} allows {max_fraction:.2%} missing")


class BadInputReport:
    """Bad items seen so far (path -> reason) and how many items were seen in all."""

    def __init__(self, total: int | None = None) -> None:
        self.total = total
        self.seen = 0
        self.occurrences = 0
        self.items: dict[str, str] = {}

    @property
    def bad(self) -> int:
        """Number of distinct bad paths."""
        return len(self.items)

    def add_seen(self, count: int) -> None:
        """Count ``count`` more delivered items (good and bad)."""
        if count < 0:
            raise ValueError(f"add_seen needs a count >= 0, got {count}")
        self.seen += count

    def add_bad(self, path: str, reason: str) -> None:
        """Record one failed item; a path already listed keeps its first reason."""
        self.occurrences += 1
        self.items.setdefault(str(path), str(reason))

    def add_batch(self, batch: Mapping[str, Any]) -> None:
        """Count a collated batch: its good items (``indices``) and its ``bad`` list."""
        bad = batch.get("bad", [])
        self.add_seen(len(batch["indices"]) + len(bad))
        for path, reason in bad:
            self.add_bad(path, reason)

    @classmethod
    def merged(cls, reports: Iterable[Mapping[str, Any]], total: int | None = None) -> BadInputReport:
        """One report of several ``to_dict()`` reports (one per process)."""
        out = cls(total=total)
        for report in reports:
            out.merge(cls.from_dict(report))
        return out

    def merge(self, other: BadInputReport) -> None:
        """Fold in another report (e.g. gathered from another process)."""
        self.seen += other.seen
        self.occurrences += other.occurrences
        for path, reason in other.items.items():
            self.items.setdefault(path, reason)

    def fraction_of(self, total: int | None = None) -> float:
        """Bad share: unique bad / ``total`` (or ``self.total``) when known, else unique bad / seen."""
        denominator = total if total is not None else self.total
        if denominator is None:
            denominator = self.seen
        return self.bad / denominator if denominator > 0 else 0.0

    @property
    def fraction(self) -> float:
        """Bad share with the report's own ``total`` (see ``fraction_of``)."""
        return self.fraction_of()

    def check(self, max_fraction: float, total: int | None = None, key: str = CONFIG_KEY) -> None:
        """Raise ``TooManyBadInputsError`` when the bad share exceeds ``max_fraction``.

        Without a known total, nothing is judged before ``MIN_SEEN_FOR_STREAM`` items were seen.
        ``key`` names the setting in the message (``--max-bad-fraction`` for ``domainclip index``).
        """
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"{key} must be between 0 and 1, got {max_fraction}")
        total = total if total is not None else self.total
        if total is None and self.seen < MIN_SEEN_FOR_STREAM:
            return
        fraction = self.fraction_of(total)
        if fraction <= max_fraction:
            return
        denominator = total if total is not None else self.seen
        shown = list(self.items.items())[:5]
        listing = "; ".join(f"{path} ({reason})" for path, reason in shown)
        more = f" and {self.bad - len(shown)} more" if self.bad > len(shown) else ""
        raise TooManyBadInputsError(
            f"{self.bad} of {denominator} data items were bad ({fraction:.2%}), more than the limit "
            f"{max_fraction:.2%} ({key}={max_fraction}). First bad items: {listing}{more}. "
            f"Fix or remove these files, or raise {key}."
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"seen", "bad", "fraction", "items": [{"path", "reason"}]}`` (plus occurrences, total)."""
        return {
            "seen": self.seen,
            "bad": self.bad,
            "fraction": self.fraction,
            "total": self.total,
            "occurrences": self.occurrences,
            "items": [{"path": path, "reason": reason} for path, reason in self.items.items()],
        }

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write ``to_dict()`` as JSON, atomically (a reader never sees half a file)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(self.to_dict(), stream, indent=2)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> BadInputReport:
        """Rebuild a report from ``to_dict()`` output (checkpoints, other processes)."""
        report = cls.from_items(((item["path"], item["reason"]) for item in saved["items"]), seen=saved["seen"],
                                total=saved.get("total"))
        report.occurrences = int(saved.get("occurrences", report.bad))
        return report

    @classmethod
    def from_items(cls, items: Iterable[tuple[str, str]], seen: int = 0, total: int | None = None) -> BadInputReport:
        """A report holding ``items`` (e.g. ``RecordSet.skipped``)."""
        report = cls(total=total)
        report.add_seen(seen)
        for path, reason in items:
            report.add_bad(path, reason)
        return report

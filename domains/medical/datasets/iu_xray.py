"""IU X-ray (OpenI) reports: parsed FINDINGS / IMPRESSION per report (text; images if present)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..reports import read_iu_reports
from .common import no_download


class IUXrayReports:
    """``{"report_id", "findings", "impression", "captions", "image_path"}`` per report.

    Args:
        root: folder holding ``reports.csv`` (or the CSV itself).
        deid_policy: ``drop`` / ``mask`` / ``keep`` for ``XXXX`` marks (``reports.py``).
        download: OpenI has no stable scripted download; ``True`` raises.
    """

    def __init__(self, root: str | os.PathLike[str], deid_policy: str = "drop", download: bool = False) -> None:
        if download:
            no_download("IUXrayReports", "https://openi.nlm.nih.gov")
        path = Path(root)
        self.csv = path / "reports.csv" if path.is_dir() else path
        self.items = read_iu_reports(self.csv, deid_policy)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, report = self.items[index]
        return {"report_id": row.get("report_id", ""), "findings": report.findings, "impression": report.impression,
                "captions": report.captions(), "image_path": str(self.csv.parent / row.get("image_path", ""))}

    @property
    def reports(self) -> list[Any]:
        return [report for _, report in self.items]

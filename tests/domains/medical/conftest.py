"""Every medical test writes its renderings and pseudonymous images under its own temporary folder."""
from __future__ import annotations

from pathlib import Path

import pytest

from domainclip.domains.medical.privacy import CACHE_ENV


@pytest.fixture(autouse=True)
def medical_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$DOMAINCLIP_MEDICAL_CACHE`` for this test (never the user's ``~/.cache``)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "medical_cache_default"))
    return tmp_path / "medical_cache_default"

"""Registry lookups load the domain packages once and name the valid choices and broken domains."""
from __future__ import annotations

import pytest

from domainclip.core import plugins
from domainclip.core.data.sources import check_format
from domainclip.core.plugins import require_registered


def test_unknown_name_lists_valid_names_closest_match_and_broken_domains(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = {"overhead": 1, "cxr": 2}
    require_registered("cxr", registry, "never raised")
    monkeypatch.setattr(plugins, "_FAILED", {"broken_domain": "ImportError: no module named 'rasterio'"})
    with pytest.raises(ValueError) as error:
        require_registered("overhaed", registry, "data.augment.name 'overhaed' is not a registered transform")
    message = str(error.value)
    assert message.startswith("data.augment.name 'overhaed' is not a registered transform; did you mean 'overhead'?")
    assert "(valid: cxr, overhead)" in message
    assert "broken_domain (ImportError: no module named 'rasterio')" in message


def test_a_registry_given_as_a_function_is_read_after_the_domains_load(monkeypatch: pytest.MonkeyPatch) -> None:
    names: set[str] = set()
    monkeypatch.setattr(plugins, "load_domain_plugins", lambda: names.add("late"))
    require_registered("late", lambda: names, "never raised")  # registered only by the plugin load
    with pytest.raises(ValueError, match=r"unknown data format 'jsnl' .*did you mean 'jsonl'"):
        check_format("jsnl")

"""BadInputReport: counting rules, the limit check and its message, JSON output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from domainclip.core.data import BadInputReport, TooManyBadInputsError


def test_unique_paths_are_counted_once_occurrences_every_time() -> None:
    report = BadInputReport()
    report.add_seen(10)
    report.add_bad("a.jpg", "truncated")
    report.add_bad("a.jpg", "truncated again")
    report.add_bad("b.jpg", "file not found")
    assert report.bad == 2 and report.occurrences == 3
    assert report.items == {"a.jpg": "truncated", "b.jpg": "file not found"}
    assert report.fraction == pytest.approx(2 / 10)
    assert report.fraction_of(total=40) == pytest.approx(2 / 40)


def test_check_with_total_uses_bad_over_total_and_names_everything() -> None:
    report = BadInputReport()
    report.add_seen(5)
    for k in range(7):
        report.add_bad(f"img_{k}.jpg", f"reason {k}")
    report.check(0.07, total=100)  # 7 / 100 is at the limit: allowed
    with pytest.raises(TooManyBadInputsError) as error:
        report.check(0.05, total=100)
    message = str(error.value)
    assert message.startswith("7 of 100 data items were bad (7.00%), more than the limit 5.00% (data.max_bad_fraction=0.05)")
    assert "img_0.jpg (reason 0); img_1.jpg (reason 1)" in message and "img_4.jpg (reason 4) and 2 more" in message
    assert "img_5.jpg" not in message
    assert message.endswith("raise data.max_bad_fraction.")
    assert isinstance(error.value, RuntimeError)


def test_stream_without_total_is_judged_only_after_100_items() -> None:
    report = BadInputReport()
    report.add_seen(99)
    for k in range(50):
        report.add_bad(f"{k}", "broken")
    report.check(0.1)  # 50 of 99 bad, but too few seen to judge a stream
    report.add_seen(1)
    with pytest.raises(TooManyBadInputsError, match="50 of 100 data items were bad"):
        report.check(0.1)


def test_add_batch_counts_good_and_bad_items_and_merge_combines() -> None:
    first, second = BadInputReport(total=8), BadInputReport(total=8)
    first.add_batch({"indices": torch.tensor([0, 1, 2]), "bad": [("x", "r")]})
    second.add_batch({"indices": torch.tensor([4]), "bad": [("x", "r"), ("y", "s")]})
    first.merge(second)
    assert (first.seen, first.bad, first.occurrences) == (7, 2, 3)
    assert first.fraction == pytest.approx(2 / 8)


def test_write_json_layout(tmp_path: Path) -> None:
    report = BadInputReport.from_items([("a.jpg", "truncated"), ("b.jpg", "missing")], seen=4)
    target = tmp_path / "run" / "bad_inputs.json"
    report.write_json(target)
    written = json.loads(target.read_text())
    assert written["seen"] == 4 and written["bad"] == 2 and written["fraction"] == 0.5
    assert written["items"] == [{"path": "a.jpg", "reason": "truncated"}, {"path": "b.jpg", "reason": "missing"}]
    assert [p.name for p in target.parent.iterdir()] == ["bad_inputs.json"]  # no temporary file left


def test_from_dict_round_trips_to_dict() -> None:
    report = BadInputReport(total=50)
    report.add_seen(30)
    for path in ("a", "b", "a"):
        report.add_bad(path, f"reason {path}")
    restored = BadInputReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert (restored.seen, restored.total, restored.occurrences, restored.items) == (30, 50, 3, {"a": "reason a", "b": "reason b"})


def test_invalid_limit_is_rejected() -> None:
    with pytest.raises(ValueError, match="data.max_bad_fraction must be between 0 and 1, got 1.5"):
        BadInputReport().check(1.5)

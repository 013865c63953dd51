"""Every bench script imports and parses its arguments: a kit refactor that breaks a bench fails here,
not on the quiet machine an hour into a measurement queue."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_") and p.name != "measure.py")


def test_every_bench_is_listed() -> None:
    assert {"train_throughput.py", "bf16_weights.py", "filip_rsicd.py", "distill.py", "serve_load.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_imports_and_shows_its_help(script: str) -> None:
    done = subprocess.run([sys.executable, script, "--help"], cwd=BENCH, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout

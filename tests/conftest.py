"""Shared test fixtures: tiny generated data and tiny recipes (nothing is downloaded)."""
from __future__ import annotations

import csv
import inspect
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": 0, "green": 1, "blue": 2}

# `precision: auto` picks bf16 on CPUs with AVX-512 BF16 / AMX (core/encode.py). The tests compare
# against fp32 references, so they run as on a CPU without bf16 instructions whatever the machine;
# subprocesses (CLI, `accelerate launch`) inherit this. The bf16 paths are tested by explicit precision.
os.environ["DOMAINCLIP_CPU_BF16"] = "0"


def shared_data_root() -> Path:
    """``../shared/data`` beside the repository, or ``$DOMAINCLIP_SHARED_DATA``."""
    env = os.environ.get("DOMAINCLIP_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_colour_squares(folder: Path, count: int = 24, size: int = 40, seed: int = 0) -> Path:
    """``count`` noisy single-colour JPEGs with captions and labels; returns the CSV manifest."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    names = list(COLOURS)
    for i in range(count):
        colour = names[i % len(names)]
        pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        pixels[..., COLOURS[colour]] += 180
        Image.fromarray(pixels).save(folder / "img" / f"{i}.jpg")
        rows.append({"image": f"img/{i}.jpg", "caption": f"a {colour} square|a square coloured {colour}",
                     "label": colour})
    manifest = folder / "train.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.fixture
def colour_squares(tmp_path: Path) -> Path:
    return write_colour_squares(tmp_path / "data")


def tiny_recipe(manifest: Path, output_dir: Path, **train: object) -> dict:
    """A recipe for the tiny open_clip architecture on the colour squares."""
    return {
        "name": "tiny",
        "output_dir": str(output_dir),
        "model": {"kind": "open_clip", "name": "domainclip-tiny-vit"},
        "data": {"train": {"format": "csv", "path": str(manifest), "label_key": "label", "caption_separator": "|"},
                 "batch_size": 8, "num_workers": 0},
        "train": {"max_steps": 6, "lr": 1e-3, "precision": "no", "log_every": 1, "progress": False,
                  "tensorboard": False, **train},
    }


# --- `slow`: end-to-end tests, marked by what they call ----------------------------------------
# A test is end-to-end when it, or a fixture it uses, trains, runs a CLI command, a comparison,
# a WiSE-FT sweep, an export, a publish, a base rebuild or a subprocess. `pytest -m "not slow"`
# runs the rest: the quick loop.
END_TO_END_CALLS = re.compile(r"(?<![\w.])(train|main|compare|wise_ft_sweep|export_run|publish_run|stage_folder|"
                              r"build_base|export_compact_base|_train)\(|subprocess\.|accelerate launch")


def _source(function: object) -> str:
    try:
        return inspect.getsource(function)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def is_end_to_end(item: pytest.Item) -> bool:
    """True when the test function or one of its fixtures calls an end-to-end entry point."""
    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else []):
        functions.extend(d.func for d in defs)
    return any(END_TO_END_CALLS.search(_source(f)) for f in functions if f is not None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "slow" not in item.keywords and is_end_to_end(item):
            item.add_marker(pytest.mark.slow)

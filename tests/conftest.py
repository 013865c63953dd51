"""Shared test fixtures: tiny generated data and tiny recipes (nothing is downloaded)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": 0, "green": 1, "blue": 2}


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

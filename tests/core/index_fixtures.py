"""Shared pieces of the index / search / serve tests: the compact base encoder and a small index."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from PIL import Image

from tests.conftest import write_colour_squares


def colour_data(folder: Path, count: int = 20) -> Path:
    """Colour squares (as tests/conftest.py) plus one unreadable file listed in the manifest."""
    manifest = write_colour_squares(folder, count=count)
    (folder / "img" / "broken.jpg").write_text("this is not an image")
    with open(manifest) as handle:
        rows = list(csv.DictReader(handle))
    rows.insert(5, {"image": "img/broken.jpg", "caption": "broken", "label": "red"})
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


DATA_OPTIONS = {"label_key": "label", "caption_separator": "|"}


def png_bytes(colour: tuple[int, int, int], size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()

"""Tiny fake PlantVillage-layout data: a coloured leaf (ellipse) on a black background per image.

    python tests/domains/agriculture/make_fake_data.py /tmp/fake_plantvillage

Leaf colour depends on the class, so a model can tell the classes apart; nothing is downloaded.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = {"Apple___Apple_scab": (90, 110, 40), "Apple___Black_rot": (70, 50, 30),
           "Apple___Cedar_apple_rust": (200, 140, 30), "Apple___healthy": (40, 160, 50),
           "Grape___Black_rot": (80, 60, 40), "Tomato___healthy": (50, 150, 70)}
APPLE = [name for name in CLASSES if name.startswith("Apple")]


def leaf_image(colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    """A noisy coloured ellipse on pure black (like segmented PlantVillage images)."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    margin = size // 6
    draw.ellipse([margin, margin // 2, size - margin, size - margin // 2], fill=colour)
    pixels = np.asarray(image).astype(np.int16)
    leaf = pixels.sum(axis=2, keepdims=True) > 0
    noisy = np.where(leaf, np.clip(pixels + rng.integers(-20, 20, pixels.shape), 30, 255), 0)
    return Image.fromarray(noisy.astype(np.uint8))


def write_plantvillage(root: Path, classes: list[str] | None = None, per_class: int = 3, size: int = 32,
                       seed: int = 0) -> Path:
    """``root/images/<class>/*.jpg`` plus ``train.csv`` / ``test.csv`` (``path,label``)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        rows = []
        for name in classes or APPLE:
            (root / "images" / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                relative = f"images/{name}/{split}_{i}.png"
                leaf_image(CLASSES[name], size, rng).save(root / relative)
                rows.append({"path": relative, "label": name})
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return root


if __name__ == "__main__":
    print(write_plantvillage(Path(sys.argv[1]), list(CLASSES)))

"""Tiny fake remote-sensing data in the real layouts (run as a script to write them to a folder).

    python tests/domains/remote_sensing/make_fake_data.py /tmp/fake_rs

Every function writes a few small noisy images whose colour depends on the scene class, so a
model can tell the classes apart; nothing is downloaded.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SCENES = {"airport": (200, 200, 200), "denseresidential": (180, 60, 40), "forest": (30, 150, 40)}
CAPTIONS = {"airport": ["many planes are parked near a long runway", "an airport with a terminal on the left"],
            "denseresidential": ["many houses are densely arranged", "dense houses with a road at the top"],
            "forest": ["a large piece of green forest", "dense trees cover the area"]}


def noisy_image(colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    pixels = np.clip(np.array(colour)[None, None, :] + rng.integers(-30, 30, (size, size, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def write_karpathy_set(folder: Path, json_name: str = "dataset_rsicd.json", image_dir: str = "RSICD_images",
                       per_class: int = 4, numeric: int = 3, size: int = 40, seed: int = 0, ext: str = ".jpg") -> Path:
    """Karpathy JSON + images: ``per_class`` prefixed images per scene per split (train/test), plus
    ``numeric`` images with purely numeric names (no scene class) per split. Returns the JSON path."""
    rng = np.random.default_rng(seed)
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    entries = []
    counter = 0
    for split in ("train", "test"):
        for scene, colour in SCENES.items():
            for _ in range(per_class):
                counter += 1
                name = f"{scene}_{counter}{ext}"
                noisy_image(colour, size, rng).save(folder / image_dir / name)
                entries.append({"filename": name, "split": split,
                                "sentences": [{"raw": c, "tokens": c.split()} for c in CAPTIONS[scene]]})
        for _ in range(numeric):
            counter += 1
            name = f"{counter:05d}{ext}"
            noisy_image((100, 100, 160), size, rng).save(folder / image_dir / name)
            entries.append({"filename": name, "split": split,
                            "sentences": [{"raw": "a grey and blue area", "tokens": []}]})
    path = folder / json_name
    path.write_text(json.dumps({"images": entries, "dataset": json_name}))
    return path


def write_scene_folders(root: Path, per_class: int = 3, size: int = 32, seed: int = 1) -> Path:
    """``root/<class>/*.png`` with the glued RSICD-style class names."""
    rng = np.random.default_rng(seed)
    for scene, colour in SCENES.items():
        (root / scene).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noisy_image(colour, size, rng).save(root / scene / f"{i}.png")
    return root


def write_label_csv(folder: Path, per_class: int = 3, size: int = 32, seed: int = 2) -> Path:
    """``labels.csv`` with ``path,label`` rows pointing at ``img/*.png``."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for scene, colour in SCENES.items():
        for i in range(per_class):
            name = f"img/{scene}-{i}.png"
            noisy_image(colour, size, rng).save(folder / name)
            rows.append({"path": name, "label": scene})
    manifest = folder / "labels.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def write_torchgeo_ucmerced(root: Path, per_class: int = 2, size: int = 24, seed: int = 3) -> Path:
    """torchgeo's UC Merced layout: ``UCMerced_LandUse/Images/<class>/*.tif`` + split files."""
    rng = np.random.default_rng(seed)
    classes = {"agricultural": (90, 160, 60), "denseresidential": (180, 60, 40), "tenniscourt": (60, 120, 200)}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for scene, colour in classes.items():
        folder = root / "UCMerced_LandUse" / "Images" / scene
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class * 2):
            name = f"{scene}{i:02d}.tif"
            noisy_image(colour, size, rng).save(folder / name)
            splits["train" if i < per_class else "test"].append(name)
    for split, names in splits.items():
        (root / f"uc_merced-{split}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def write_geotiff(path: Path, bands: dict[str, np.ndarray], nodata: float | None = None,
                  describe: bool = True) -> Path:
    """A GeoTIFF with one band per entry of ``bands`` (all ``(H, W)``, same dtype); band
    descriptions are the dict's keys when ``describe``."""
    import rasterio
    from rasterio.transform import from_origin

    arrays = list(bands.values())
    height, width = arrays[0].shape
    with rasterio.open(path, "w", driver="GTiff", height=height, width=width, count=len(arrays),
                       dtype=arrays[0].dtype, nodata=nodata, crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 10, 10)) as dst:
        for index, (name, array) in enumerate(bands.items(), start=1):
            dst.write(array, index)
            if describe:
                dst.set_band_description(index, name)
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fake_remote_sensing")
    write_karpathy_set(out / "rsicd")
    write_scene_folders(out / "scene_folders")
    write_label_csv(out / "label_csv")
    write_torchgeo_ucmerced(out / "ucmerced")
    print(f"fake remote-sensing data written to {out}")

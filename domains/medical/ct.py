"""CT volumes: loading through MONAI, Hounsfield windows as channels, slices, 2.5D, aggregation.

* :func:`load_volume` reads a NIfTI file or a DICOM series folder with MONAI (``LoadImage``),
  puts it in a fixed orientation (``RAS`` by default) and optionally resamples to ``spacing``
  (mm). It returns the array ``(X, Y, Z)`` in Hounsfield units plus only the geometry (affine,
  spacing, shape): MONAI's metadata of a DICOM series holds the header tags (patient name, ID,
  dates), and it is dropped here.
* :data:`HU_WINDOWS` holds the usual (center, width) windows; :func:`window_channels` stacks
  several windows of one slice as the image channels (lung / mediastinum / bone by default).
* :func:`slab_25d` is the 2.5D alternative: one window, the slice and its neighbours as channels.
* :func:`sample_slices` picks axial slice indices (every ``stride``-th, or ``count`` evenly
  spaced, optionally only where a mask has voxels).
* :func:`aggregate_scores` turns per-slice scores into one volume score (max, mean, top-k mean,
  noisy-or); it lives in core (``core/eval/groups.py``, used by volume-level evaluation) and is
  re-exported here.
* :func:`organs_in_slice` / :func:`organ_caption` turn an organ label map into slice labels and
  captions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from domainclip.core.eval.groups import AGGREGATIONS, aggregate_scores  # noqa: F401  (re-exported)

from .privacy import safe_item

HU_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
    "liver": (60.0, 160.0),
}
DEFAULT_WINDOWS = ("lung", "mediastinum", "bone")


@dataclass
class Volume:
    """A CT volume ``(X, Y, Z)`` (axial slices along Z) in HU, or a label map, plus geometry only."""

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]


def import_monai() -> Any:
    try:
        import monai
    except ImportError as error:
        raise ImportError("reading CT volumes needs MONAI and nibabel: pip install 'domainclip[medical]'") from error
    return monai


def load_volume(path: str | os.PathLike[str], orientation: str = "RAS", spacing: tuple[float, float, float] | None = None,
                labels: bool = False) -> Volume:
    """A NIfTI file or DICOM series folder, reoriented (and resampled: nearest for ``labels``)."""
    import_monai()
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    path = os.fspath(path)
    if not os.path.exists(path):  # named by pseudonym: volume paths often hold patient IDs
        raise FileNotFoundError(f"CT volume not found: {safe_item(path, 'volume')}")
    reader = "PydicomReader" if os.path.isdir(path) else "NibabelReader"
    steps: list[Any] = [LoadImage(reader=reader, image_only=True), EnsureChannelFirst(), Orientation(axcodes=orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))]
    if spacing:
        steps.append(Spacing(pixdim=tuple(spacing), mode="nearest" if labels else "bilinear"))
    try:
        image = Compose(steps)(path)
    except Exception as error:
        raise ValueError(f"cannot read CT volume {safe_item(path, 'volume')}: {type(error).__name__}") from None
    affine = np.asarray(image.affine, dtype=np.float64)
    array = np.asarray(image.array if hasattr(image, "array") else image)[0]
    array = np.rint(array).astype(np.int32) if labels else array.astype(np.float32)
    voxel = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return Volume(array, affine, voxel)  # the MetaTensor (and its DICOM tags) is dropped here


def window(hu: np.ndarray, name_or_window: str | tuple[float, float]) -> np.ndarray:
    """Hounsfield units -> [0, 1] through a named window or a ``(center, width)`` pair."""
    if isinstance(name_or_window, str):
        if name_or_window not in HU_WINDOWS:
            raise ValueError(f"unknown HU window {name_or_window!r}; valid: {sorted(HU_WINDOWS)}")
        center, width = HU_WINDOWS[name_or_window]
    else:
        center, width = (float(v) for v in name_or_window)
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    return np.clip((hu - (center - width / 2.0)) / width, 0.0, 1.0).astype(np.float32)


def axial_slice(volume: np.ndarray, z: int) -> np.ndarray:
    """Slice ``z`` of an ``(X, Y, Z)`` RAS volume as an image ``(rows, cols)`` = (anterior at top)."""
    if not 0 <= z < volume.shape[2]:
        raise IndexError(f"slice {z} outside the volume's {volume.shape[2]} axial slices")
    return np.ascontiguousarray(np.flipud(volume[:, :, z].T))


def window_channels(hu_slice: np.ndarray, windows: tuple[str | tuple[float, float], ...] = DEFAULT_WINDOWS) -> np.ndarray:
    """One 2-D HU slice as ``(C, H, W)`` in [0, 1], one channel per window."""
    return np.stack([window(hu_slice, w) for w in windows])


def slab_25d(volume: np.ndarray, z: int, name_or_window: str | tuple[float, float] = "abdomen",
             neighbours: int = 1) -> np.ndarray:
    """2.5D input ``(2 * neighbours + 1, H, W)``: slices ``z - n .. z + n`` in one window (edges repeated)."""
    depth = volume.shape[2]
    indices = [min(max(z + offset, 0), depth - 1) for offset in range(-neighbours, neighbours + 1)]
    return np.stack([window(axial_slice(volume, i), name_or_window) for i in indices])


def sample_slices(depth: int, stride: int = 1, count: int = 0, mask: np.ndarray | None = None) -> list[int]:
    """Axial indices: ``count`` evenly spaced (when > 0) or every ``stride``-th; only where
    ``mask`` (``(X, Y, Z)``) has voxels when given."""
    if stride < 1 or count < 0:
        raise ValueError(f"stride must be >= 1 and count >= 0, got {stride} and {count}")
    candidates = list(range(depth))
    if mask is not None:
        candidates = [z for z in candidates if mask[:, :, z].any()]
    if count:
        if count >= len(candidates):
            return candidates
        return [candidates[int(round(i))] for i in np.linspace(0, len(candidates) - 1, count)]
    return candidates[::stride]


def organs_in_slice(label_slice: np.ndarray, names: dict[int, str], min_voxels: int = 1) -> list[str]:
    """Organ names with at least ``min_voxels`` voxels in a 2-D label slice (label order)."""
    ids, counts = np.unique(label_slice, return_counts=True)
    return [names[int(i)] for i, c in zip(ids, counts) if int(i) in names and int(i) != 0 and c >= min_voxels]


def readable_organ(name: str) -> str:
    """TotalSegmentator names (``kidney_left``, ``vertebrae_L1``) as words ("left kidney", "L1 vertebra")."""
    parts = name.split("_")
    sides = {"left", "right"}
    if len(parts) == 2 and parts[1] in sides:
        return f"{parts[1]} {parts[0]}"
    if parts[0] == "vertebrae" and len(parts) == 2:
        return f"{parts[1]} vertebra"
    return " ".join(parts)


def organ_caption(organs: list[str], template: str = "an axial CT slice showing {}.", limit: int = 5) -> str:
    """A caption naming up to ``limit`` organs (largest first as given); none -> "no labelled organ"."""
    words = [readable_organ(o) for o in organs[:limit]] or ["no labelled organ"]
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    return template.replace("{}", listed)

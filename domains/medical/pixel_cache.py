"""Rendered pixels on disk under pseudonymous names: what the core loader opens instead of DICOM.

The core data pipeline opens images with PIL. DICOM files (and CT slices) are therefore decoded
once by the medical readers and written as 8-bit PNG files to the medical cache
(:func:`privacy.cache_root`): ``<cache>/<kind>/<pseudonym>.png`` plus ``<pseudonym>.json`` holding
only technical metadata (view position, photometric interpretation, bits, size). Nothing else is
written: no source path, no file name, no identifying attribute. The records the kit trains on
point at these PNG files, so run folders, ``bad_inputs.json`` and feature caches see only hashes.
PNG and JPEG sources are not re-encoded: :func:`pseudonymous_image` gives them a pseudonymous
name in the cache (a hard link, or a copy), for the same reason.

Writes are atomic (core ``atomic_write_bytes``), so concurrent processes cannot leave half files.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from domainclip.core.checkpoint import atomic_write_bytes, atomic_write_text

from .privacy import TECHNICAL_KEYWORDS, cache_root, pseudonym

RENDER_VERSION = 1


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] (any shape) -> uint8 0..255 (values outside are clipped)."""
    return np.round(np.clip(np.nan_to_num(array, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)


def write_png(array: np.ndarray, dest: Path) -> None:
    """``(H, W)`` grey or ``(3, H, W)`` / ``(H, W, 3)`` float [0, 1] pixels as a PNG (no text chunks)."""
    pixels = to_uint8(array)
    if pixels.ndim == 3 and pixels.shape[0] == 3:
        pixels = pixels.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    atomic_write_bytes(dest, buffer.getvalue())


def cached_paths(kind: str, source: str | os.PathLike[str], *key: object,
                 root: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """(png, json) paths of one rendering of ``source`` (``key`` = window, slice index, ...)."""
    name = pseudonym(source, kind, RENDER_VERSION, *key)
    folder = cache_root(root) / kind
    return folder / f"{name}.png", folder / f"{name}.json"


def pseudonymous_image(source: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """A PNG / JPEG source under a pseudonymous name: ``<cache>/image/<pseudonym><suffix>``.

    A hard link to the file (no bytes copied, and unlike a symbolic link it stores no path), or a
    byte copy when the cache is on another file system. Records then name this file, so a patient
    folder in the source path (CheXpert's ``patient00001/study1/view1_frontal.jpg``, MIMIC's
    ``p10/p10000032/``) reaches no record, skip list, log or feature cache. For a missing source
    the returned file does not exist either: the loader reports it missing under the pseudonym.
    """
    name = pseudonym(source, "image", RENDER_VERSION)
    dest = cache_root(root) / "image" / f"{name}{Path(source).suffix.lower()}"
    if dest.is_file() or not os.path.isfile(source):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    temporary = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.link(source, temporary)
    except OSError:  # another file system (or one without hard links)
        shutil.copyfile(source, temporary)
    os.replace(temporary, dest)
    return dest


def save_rendering(array: np.ndarray, meta: dict[str, Any], png: Path, sidecar: Path) -> None:
    """Write the pixels and the technical metadata (only whitelisted keys and ``view``)."""
    png.parent.mkdir(parents=True, exist_ok=True)
    write_png(array, png)
    allowed = {k: v for k, v in meta.items() if k in TECHNICAL_KEYWORDS or k in ("view", "slice", "windows")}
    atomic_write_text(sidecar, json.dumps(allowed, sort_keys=True))


def load_sidecar(png: Path, sidecar: Path) -> dict[str, Any] | None:
    """The metadata of an existing rendering, or None when it must be (re)made."""
    if not (png.is_file() and sidecar.is_file()):
        return None
    try:
        return json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None

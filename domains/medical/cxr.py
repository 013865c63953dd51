"""Chest X-ray records: DICOM files rendered once to cached PNG, filtered by view position.

:func:`dicom_records` takes any ``RecordSet`` whose images may be DICOM files (``.dcm``,
``.dicom``, or any file with the ``DICM`` magic) and returns one whose DICOM images are replaced
by their cached renderings (``pixel_cache.py``); PNG and JPEG images keep their pixels but are
named pseudonymously (``pixel_cache.pseudonymous_image``: a hard link or copy in the cache, so
no patient folder of their path reaches a record) and become three channels once, in core's
loader (grey ``L`` -> RGB). URLs and archive members are read as they are. Unreadable DICOM files, files
of an unwanted view and files flagged ``BurnedInAnnotation = YES`` (text burnt into the pixels
may name the patient) are listed in ``RecordSet.skipped`` under a pseudonym, never their path.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from domainclip.core.data.dataset import BadImageError
from domainclip.core.data.records import ImageTextRecord, RecordSet
from domainclip.core.data.sources import IMAGE_EXTENSIONS

from .dicom import check_views, read_dicom
from .pixel_cache import cached_paths, load_sidecar, pseudonymous_image, save_rendering
from .privacy import safe_item

DICOM_SUFFIXES = (".dcm", ".dicom")


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """``.dcm``/``.dicom`` suffix, or any file without an image suffix that starts with the DICOM
    preamble + ``DICM`` (series files are often named by UID, ``CT.1.3.12.2...``, with dots)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in IMAGE_EXTENSIONS or not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(132)[128:] == b"DICM"


def render_dicom(path: str | os.PathLike[str], window: tuple[float, float] | None = None,
                 root: str | os.PathLike[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """The cached 8-bit PNG of one DICOM radiograph and its technical metadata (made if missing)."""
    png, sidecar = cached_paths("cxr", path, tuple(window) if window else None, root=root)
    meta = load_sidecar(png, sidecar)
    if meta is None:
        pixels, meta = read_dicom(path, window)
        save_rendering(pixels, meta, png, sidecar)
    return png, meta


def dicom_records(record_set: RecordSet, views: tuple[str, ...] | list[str] = (),
                  window: tuple[float, float] | None = None, skip_burned_in: bool = True,
                  root: str | os.PathLike[str] | None = None) -> RecordSet:
    """``record_set`` with DICOM images rendered and filtered (see the module docstring).

    Args:
        views: keep only these view positions (``PA``, ``AP``, ``LATERAL``); ``()`` keeps all.
            PNG/JPEG images carry no view and are kept.
        window: force this ``(center, width)`` instead of the file's VOI LUT / window.
        skip_burned_in: leave out files whose header says text is burnt into the pixels.
        root: cache folder (default ``$DOMAINCLIP_MEDICAL_CACHE`` or ``~/.cache/domainclip/medical``).
    """
    wanted = check_views(list(views))
    records: list[ImageTextRecord] = []
    skipped = list(record_set.skipped)
    for record in record_set.records:
        if "://" in record.image or "::" in record.image:  # URLs and archive members: read as they are
            records.append(record)
            continue
        if not is_dicom(record.image):  # PNG / JPEG: the same pixels under a pseudonymous name
            records.append(dataclasses.replace(record, image=str(pseudonymous_image(record.image, root))))
            continue
        try:
            png, meta = render_dicom(record.image, window, root)
        except BadImageError as error:
            skipped.append((safe_item(record.image), error.reason))
            continue
        if wanted and meta.get("view") not in wanted:
            skipped.append((safe_item(record.image), f"view {meta.get('view') or 'unknown'} not in {list(wanted)}"))
            continue
        if skip_burned_in and str(meta.get("BurnedInAnnotation", "")).upper() == "YES":
            skipped.append((safe_item(record.image), "BurnedInAnnotation = YES (text in the pixels)"))
            continue
        records.append(dataclasses.replace(record, image=str(png), captions=list(record.captions)))  # keeps group
    return RecordSet(records, record_set.class_names, record_set.raw_class_names, skipped)

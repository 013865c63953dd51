"""Keeping patient identifiers out of everything the kit writes.

DICOM headers carry the patient's name, ID, birth date, accession number, dates and the
institution. The medical readers never hand a ``pydicom`` dataset (whose ``repr`` prints every
attribute) to a log, an exception, a cache or a record: they copy the few *technical* attributes
in :data:`TECHNICAL_KEYWORDS` into a plain dict with :func:`technical_metadata` and drop the
rest at once. Cached pixels are stored under :func:`pseudonym` names (a salted hash of the source
path, size and modification time), so file and folder names such as ``p10000032/s50414267.dcm``
never reach a record, ``bad_inputs.json``, a feature cache or a model card. Free text that may
hold an identifier (error messages, paths) goes through core's card scrubber
(:func:`domainclip.core.cards.scrub_text`) via :func:`safe_text`.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from domainclip.core.cards import scrub_text

# DICOM attributes (keywords) that identify a patient, a study or a place. Never copied anywhere;
# listed so tests and reviewers can check against them.
PHI_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientAddress", "PatientTelephoneNumbers",
    "PatientMotherBirthName", "MedicalRecordLocator", "PatientAge", "PatientSex", "PatientWeight",
    "PatientSize", "EthnicGroup", "AccessionNumber", "StudyID", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "FrameOfReferenceUID", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianName", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "OperatorsName", "StationName", "DeviceSerialNumber",
    "RequestingPhysician", "StudyDescription", "SeriesDescription", "ImageComments",
)

# The only attributes the readers keep (pixel decoding, windowing, view and geometry).
TECHNICAL_KEYWORDS: tuple[str, ...] = (
    "Modality", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "SamplesPerPixel", "Rows", "Columns", "RescaleSlope", "RescaleIntercept",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "ViewPosition", "PixelSpacing",
    "ImagerPixelSpacing", "SliceThickness", "BurnedInAnnotation",
)

CACHE_ENV = "DOMAINCLIP_MEDICAL_CACHE"


def _plain(value: Any) -> Any:
    """A pydicom value as a JSON-ready Python value (numbers, strings, lists of them)."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str)) or value is None:
        return value
    for cast in (int, float):
        try:
            return cast(value)
        except (TypeError, ValueError):
            continue
    return str(value)


def technical_metadata(dataset: Any) -> dict[str, Any]:
    """Only the :data:`TECHNICAL_KEYWORDS` present in a pydicom dataset, as plain values."""
    return {key: _plain(dataset.get(key)) for key in TECHNICAL_KEYWORDS if dataset.get(key) is not None}


def pseudonym(path: str | os.PathLike[str], *extra: object) -> str:
    """A 32-hex-digit name for a source file (absolute path, size, mtime and ``extra`` hashed).

    Salted with :data:`CACHE_ENV`'s folder so the hash of a known path cannot be looked up in
    another site's cache; it identifies nothing by itself.
    """
    resolved = Path(path).expanduser().resolve()
    try:
        stat = resolved.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        stamp = (-1, -1)
    digest = hashlib.sha256(repr((str(resolved), stamp, extra, str(cache_root()))).encode("utf-8"))
    return digest.hexdigest()[:32]


def cache_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Folder of rendered pixels: ``root``, else ``$DOMAINCLIP_MEDICAL_CACHE``, else
    ``~/.cache/domainclip/medical``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "domainclip" / "medical"


def safe_text(text: str) -> str:
    """``text`` with paths, file names, dates and id-like words replaced (core's card scrubber)."""
    return scrub_text(text)[0]


def safe_item(path: str | os.PathLike[str], kind: str = "dicom") -> str:
    """How a source file is named in skip lists and errors: ``<kind>:<pseudonym>`` (never its path)."""
    return f"{kind}:{pseudonym(path)}"


def check_no_phi(dataset: Any, text: str) -> list[str]:
    """The identifying attribute keywords of ``dataset`` whose value occurs in ``text`` (for tests/audits)."""
    found = []
    for key in PHI_KEYWORDS:
        value = dataset.get(key)
        if value is not None and str(value).strip() and str(value) in text:
            found.append(key)
    return found

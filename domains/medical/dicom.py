"""DICOM radiographs to float pixels: rescale, VOI LUT / window, MONOCHROME1 inversion, view filter.

:func:`decode_dicom` is the array transform: ``(pydicom dataset) -> (H, W) float32 in [0, 1]``.

1. Stored values (8, 12 or 16 bits, signed or not) become float; the modality LUT (``Rescale
   Slope`` / ``Intercept``) is applied.
2. Grey-level mapping of the rescaled values, first that applies: an explicit
   ``window=(center, width)``; the file's VOI LUT sequence (scaled by the LUT's output bit
   depth); the file's first ``WindowCenter`` / ``WindowWidth`` (linear, or sigmoid when
   ``VOILUTFunction`` says so); otherwise the image's own minimum..maximum.
3. ``MONOCHROME1`` (bright = low values) is inverted so bone is always bright.

:func:`read_dicom` opens a file and returns the pixels plus :func:`privacy.technical_metadata`
only; the dataset (with the patient's name, ID and dates) is dropped before returning, and
errors name the file by pseudonym, never by its attributes. pydicom is imported lazily (extra
``medical``).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from domainclip.core.data.dataset import BadImageError

from .privacy import safe_text, technical_metadata

VIEWS = ("PA", "AP", "LATERAL")
_VIEW_ALIASES = {"PA": "PA", "POSTERO_ANTERIOR": "PA", "AP": "AP", "ANTERO_POSTERIOR": "AP", "LL": "LATERAL",
                 "RL": "LATERAL", "LAT": "LATERAL", "LATERAL": "LATERAL", "LLD": "LATERAL", "RLD": "LATERAL"}


def import_pydicom() -> Any:
    """pydicom, or an ImportError saying how to install it."""
    try:
        import pydicom
    except ImportError as error:
        raise ImportError("reading DICOM needs pydicom: pip install 'domainclip[medical]'") from error
    return pydicom


def normalise_view(value: Any) -> str:
    """``ViewPosition`` as ``PA``, ``AP``, ``LATERAL`` or ``""`` (unknown / absent)."""
    key = str(value or "").strip().upper().replace(" ", "_").replace("-", "_")
    return _VIEW_ALIASES.get(key, "")


def check_views(views: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate a view filter (``[]`` = every view)."""
    wanted = tuple(str(v).upper() for v in views)
    bad = [v for v in wanted if v not in VIEWS]
    if bad:
        raise ValueError(f"unknown view position(s) {bad}; valid: {list(VIEWS)}")
    return wanted


def _first(value: Any) -> float:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM window (PS3.3 C.11.2.1.2) mapped to [0, 1]: linear (clipped) or sigmoid."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    if function.upper() == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    low = center - 0.5 - (width - 1.0) / 2.0
    return np.clip((values - low) / max(width - 1.0, 1e-6), 0.0, 1.0).astype(np.float32)


def min_max(values: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1] by the image's own range (a constant image becomes 0)."""
    low, high = float(values.min()), float(values.max())
    return np.zeros_like(values, dtype=np.float32) if high <= low else ((values - low) / (high - low)).astype(np.float32)


def voi_lut_grey(values: np.ndarray, dataset: Any) -> np.ndarray:
    """Modality-LUT output (values after Rescale Slope / Intercept, PS3.3 C.11.2) through the first
    VOI LUT, scaled by the LUT's output bits to [0, 1]. Values below the first mapped value get the
    first entry, values past the table the last; non-integer values are floored.

    Done here rather than by ``pydicom.pixels.apply_voi``, which indexes the table with an array
    of the *output* type: an 8-bit LUT with more than 256 entries (12-bit input) wraps the
    indices and returns wrong values. LUT Data as US values or as OW words (one entry per 16-bit
    word, or 8-bit entries packed one per byte when the data is exactly one byte per entry).
    """
    item = dataset.VOILUTSequence[0]
    count, first, bits = (int(v) for v in item.LUTDescriptor)
    count = count or 2**16
    if bits not in (8, *range(10, 17)):
        raise BadImageError(f"VOI LUT entries of {bits} bits (the standard allows 8 or 10-16)")
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):
        little = getattr(getattr(dataset, "file_meta", None), "_tsyntax_encoding", (None, True))[1] is not False
        packed = bits == 8 and len(raw) == count
        table = np.frombuffer(raw, dtype=np.uint8 if packed else ("<u2" if little else ">u2"))
    else:
        table = np.atleast_1d(np.asarray(raw, dtype=np.int64))  # US: a pydicom MultiValue (or one int)
    if len(table) < count:
        raise BadImageError(f"VOI LUT holds {len(table)} entries, its descriptor says {count}")
    index = np.clip(np.floor(np.asarray(values, dtype=np.float64)).astype(np.int64) - first, 0, count - 1)
    grey = table[:count].astype(np.float64)[index] / (2**bits - 1)
    return np.clip(grey, 0, 1).astype(np.float32)


def decode_dicom(dataset: Any, window: tuple[float, float] | None = None, use_voi: bool = True) -> np.ndarray:
    """A single-frame grey DICOM's pixels as ``(H, W)`` float32 in [0, 1] (steps in the module docstring)."""
    from pydicom.pixels import apply_modality_lut

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise BadImageError(f"DICOM photometric interpretation {photometric} is not grey-level")
    stored = dataset.pixel_array
    if stored.ndim != 2:
        raise BadImageError(f"expected a single-frame 2-D DICOM image, got pixel shape {tuple(stored.shape)}")
    values = np.asarray(apply_modality_lut(stored, dataset), dtype=np.float64)
    if window is not None:
        grey = apply_window(values, float(window[0]), float(window[1]))
    elif use_voi and "VOILUTSequence" in dataset:
        grey = voi_lut_grey(values, dataset)  # after the modality LUT, like the window (PS3.3 C.11.2)
    elif use_voi and dataset.get("WindowCenter") is not None and dataset.get("WindowWidth") is not None:
        grey = apply_window(values, _first(dataset.WindowCenter), _first(dataset.WindowWidth),
                            str(dataset.get("VOILUTFunction", "LINEAR")))
    else:
        grey = min_max(values)
    if photometric == "MONOCHROME1":
        grey = 1.0 - grey
    return grey.astype(np.float32)


def read_dicom(path: str | os.PathLike[str], window: tuple[float, float] | None = None,
               use_voi: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Pixels (``decode_dicom``) and technical metadata of one file; ``BadImageError`` when unusable.

    The returned metadata has ``view`` (``PA``/``AP``/``LATERAL``/``""``) and only technical
    attributes; no identifying attribute leaves this function, not even in an error message.
    """
    pydicom = import_pydicom()
    try:
        dataset = pydicom.dcmread(os.fspath(path))
    except FileNotFoundError:
        raise BadImageError("file not found") from None
    except Exception as error:  # InvalidDicomError, truncated files, ...
        raise BadImageError(f"cannot read DICOM: {type(error).__name__}: {safe_text(str(error))}") from None
    meta = technical_metadata(dataset)
    meta["view"] = normalise_view(meta.get("ViewPosition"))
    try:
        pixels = decode_dicom(dataset, window, use_voi)
    except BadImageError:
        raise
    except Exception as error:  # missing pixel data, unsupported transfer syntax...
        raise BadImageError(f"cannot decode DICOM pixels: {type(error).__name__}: {safe_text(str(error))}") from None
    finally:
        del dataset
    return pixels, meta

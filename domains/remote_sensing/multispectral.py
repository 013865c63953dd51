"""Multispectral GeoTIFF input: read bands by name, handle nodata, normalise per band.

rasterio is part of the optional extra ``geo``; it is imported only when a file is read.

Band names. A GeoTIFF's band descriptions (``rasterio``'s ``descriptions``) name its bands; when a
file has none, pass ``file_band_names`` (the names of all its bands, in order); otherwise the bands
are called ``B1``, ``B2``, ... Selecting ``bands=("B04", "B03", "B02", "B08")`` returns those bands
in that order; a name the file lacks is an error listing the names it has.

Nodata. A pixel is invalid in a band when it equals the nodata value (the ``nodata`` argument,
else the file's own) or is not finite. :class:`MultiBandImage` keeps the invalid pixels as NaN
and a ``valid`` mask; statistics skip them, and :meth:`BandStats.normalise` sets them to 0,
i.e. to the band's mean after normalisation, so they carry no signal into the model.

Statistics. :meth:`BandStats.from_images` computes each band's mean and standard deviation over
the valid pixels of the given images (in float64); :meth:`BandStats.from_torchgeo` takes
torchgeo's published EuroSAT statistics; or give them directly.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch


def import_rasterio():  # noqa: ANN201 - the module
    """``rasterio``, or an ImportError saying how to install the ``geo`` extra."""
    try:
        import rasterio
    except ImportError as error:
        raise ImportError("rasterio is not installed; GeoTIFF reading needs the optional extra: "
                          "pip install 'domainclip[geo]' (torchgeo, rasterio)") from error
    return rasterio


@dataclass
class MultiBandImage:
    """Bands of one image: ``array`` ``(C, H, W)`` float32 (invalid pixels NaN), names, mask."""

    array: np.ndarray
    band_names: list[str]
    valid: np.ndarray  # (C, H, W) bool

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


def read_geotiff(path: str | os.PathLike[str], bands: Sequence[str] | None = None,
                 file_band_names: Sequence[str] | None = None, nodata: float | None = None) -> MultiBandImage:
    """Read the named ``bands`` (default: all) of a GeoTIFF (see the module docstring)."""
    rasterio = import_rasterio()
    try:
        source = rasterio.open(path)
    except rasterio.errors.RasterioIOError as error:
        raise FileNotFoundError(f"cannot open GeoTIFF '{path}': {error}") from error
    with source:
        names = file_band_names_of(source, file_band_names, path)
        wanted = list(bands) if bands is not None else names
        missing = [name for name in wanted if name not in names]
        if missing:
            raise KeyError(f"{path}: no band named {missing}; the file's bands are {names}")
        indexes = [names.index(name) + 1 for name in wanted]
        array = source.read(indexes).astype(np.float32)
        fill = nodata if nodata is not None else source.nodata
    valid = np.isfinite(array)
    if fill is not None and not (isinstance(fill, float) and math.isnan(fill)):
        valid &= array != np.float32(fill)
    array = np.where(valid, array, np.nan).astype(np.float32)
    return MultiBandImage(array, wanted, valid)


def file_band_names_of(source, given: Sequence[str] | None, path: object) -> list[str]:  # noqa: ANN001
    """The names of all bands of an open rasterio data set (descriptions, ``given`` or B1..Bn)."""
    if given is not None:
        if len(given) != source.count:
            raise ValueError(f"{path}: file_band_names has {len(given)} names but the file has {source.count} bands")
        return list(given)
    descriptions = list(source.descriptions or ())
    if descriptions and all(descriptions):
        return [str(d) for d in descriptions]
    return [f"B{i}" for i in range(1, source.count + 1)]


@dataclass
class BandStats:
    """Per-band normalisation statistics (in the data's own units)."""

    band_names: list[str]
    mean: list[float]
    std: list[float]

    def __post_init__(self) -> None:
        if not len(self.band_names) == len(self.mean) == len(self.std):
            raise ValueError(f"band_names, mean and std must have one entry per band, got "
                             f"{len(self.band_names)}, {len(self.mean)}, {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"every std must be > 0, got {self.std} for bands {self.band_names}")

    @classmethod
    def from_images(cls, images: Iterable[MultiBandImage]) -> "BandStats":
        """Mean and standard deviation of each band over the valid pixels of ``images``."""
        names: list[str] | None = None
        total = count = square = None
        for image in images:
            if names is None:
                names = list(image.band_names)
                total, square, count = (np.zeros(len(names)) for _ in range(3))
            elif image.band_names != names:
                raise ValueError(f"images have different bands: {image.band_names} vs {names}")
            values = np.where(image.valid, image.array, 0.0).astype(np.float64)
            total += values.sum(axis=(1, 2))
            square += (values ** 2).sum(axis=(1, 2))
            count += image.valid.sum(axis=(1, 2))
        if names is None:
            raise ValueError("BandStats.from_images got no images")
        if (count == 0).any():
            empty = [n for n, c in zip(names, count) if c == 0]
            raise ValueError(f"bands {empty} have no valid pixel in the given images")
        mean = total / count
        std = np.sqrt(np.maximum(square / count - mean ** 2, 0.0))
        return cls(names, mean.tolist(), np.where(std > 0, std, 1.0).tolist())

    @classmethod
    def from_torchgeo(cls, bands: Sequence[str]) -> "BandStats":
        """torchgeo's published EuroSAT (Sentinel-2) statistics for the named bands."""
        try:
            from torchgeo.datamodules import eurosat
        except ImportError as error:
            raise ImportError("torchgeo is not installed: pip install 'domainclip[geo]'") from error
        missing = [b for b in bands if b not in eurosat.MEAN]
        if missing:
            raise KeyError(f"torchgeo has no EuroSAT statistics for bands {missing}; known: {sorted(eurosat.MEAN)}")
        return cls(list(bands), [float(eurosat.MEAN[b]) for b in bands], [float(eurosat.STD[b]) for b in bands])

    def select(self, bands: Sequence[str]) -> "BandStats":
        """The statistics of ``bands`` in that order."""
        missing = [b for b in bands if b not in self.band_names]
        if missing:
            raise KeyError(f"no statistics for bands {missing}; have {self.band_names}")
        where = [self.band_names.index(b) for b in bands]
        return BandStats(list(bands), [self.mean[i] for i in where], [self.std[i] for i in where])

    def normalise(self, image: MultiBandImage) -> torch.Tensor:
        """``(C, H, W)`` float tensor ``(x - mean) / std`` per band; invalid pixels become 0."""
        stats = self.select(image.band_names)
        mean = np.asarray(stats.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(stats.std, dtype=np.float32)[:, None, None]
        out = np.where(image.valid, (image.array - mean) / std, 0.0).astype(np.float32)
        return torch.from_numpy(out)

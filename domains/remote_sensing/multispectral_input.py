"""Multispectral training input: ``model.input: {name: multispectral, ...}`` and the ``geotiff`` reader.

A recipe asks for N-band input in its ``model:`` section::

    model:
      kind: open_clip
      name: ViT-B-32
      pretrained: laion2b_s34b_b79k
      input:
        name: multispectral
        bands: [B02, B03, B04, B08]   # the bands the tower reads, in this order
        rgb: [B04, B03, B02]          # which bands get the pretrained red, green, blue filters
        stats: data                   # mean/std per band: data (from data.train) | torchgeo | given

:class:`MultispectralInput` lists every option. When the backbone is created, the vision tower's
patch embedding is widened to the bands (``band_adapt.adapt_vision_tower``, rule documented
there) and its ``preprocess`` gets the per-band ``mean``/``std`` and ``reader: {name: geotiff,
bands: ...}``, so every data set built from that preprocessing (training, evaluation, zero-shot)
opens its files with :class:`GeoTiffReader` and resizes / crops / normalises N-channel tensors
(core/data/transforms.py).

Statistics. ``stats: data`` computes each band's mean and std over the valid pixels of up to
``stats_images`` training images (evenly spaced over data.train) with ``BandStats.from_images``;
``stats: torchgeo`` takes torchgeo's EuroSAT statistics; ``stats: given`` needs ``mean`` and
``std``. ``domainclip train`` writes the resolved ``mean``/``std`` into the run's config.yaml and
model/model.json, so ``load_trained``, ``domainclip eval`` and ``export --format adapter``
rebuild exactly the trained tower without the training data.

Errors. A band a file lacks stops training with an error naming the band, the file and the bands
the file has; an unreadable file is a bad input (counted, skipped) like an unreadable JPEG.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from domainclip.core import config as config_lib
from domainclip.core.backbones.base import Backbone, PreprocessConfig
from domainclip.core.backbones.factory import register_input_adapter
from domainclip.core.data.dataset import BadImageError
from domainclip.core.data.transforms import register_image_reader

from .band_adapt import adapt_vision_tower
from .multispectral import BandStats, read_geotiff

STATS_SOURCES = ("data", "torchgeo", "given")
SENTINEL2_RGB = ["B04", "B03", "B02"]


@dataclass
class MultispectralInput:
    """Options of ``model.input`` with ``name: multispectral``.

    Attributes:
        name: ``multispectral``.
        bands: band names the tower reads, in order (as in the files' band descriptions, or in
            ``file_band_names``; files without either have bands ``B1``, ``B2``, ...).
        rgb: the bands that get the pretrained red, green and blue filters (default
            ``[B04, B03, B02]``, Sentinel-2, when all three are in ``bands``).
        stats: where ``mean``/``std`` come from: ``data``, ``torchgeo`` or ``given``.
        stats_images: ``stats: data`` reads at most this many training images (evenly spaced).
        mean: per-band means in the files' units (filled in by ``domainclip train``).
        std: per-band standard deviations in the files' units (filled in likewise).
        file_band_names: names of all bands of every file, in file order, for files without
            band descriptions (EuroSAT-MS: ``[B01, B02, ..., B08, B09, B10, B11, B12, B8A]``, B8A last).
        nodata: pixel value marking missing data (default: each file's own nodata value).
    """

    name: str = "multispectral"
    bands: list[str] = field(default_factory=list)
    rgb: list[str] = field(default_factory=list)
    stats: str = "data"
    stats_images: int = 512
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    file_band_names: list[str] = field(default_factory=list)
    nodata: float | None = None

    def __post_init__(self) -> None:
        if len(self.bands) < 1 or len(set(self.bands)) != len(self.bands):
            raise ValueError(f"model.input.bands must name each band once, got {self.bands}")
        if not self.rgb and all(b in self.bands for b in SENTINEL2_RGB):
            self.rgb = list(SENTINEL2_RGB)
        if len(self.rgb) != 3 or any(b not in self.bands for b in self.rgb):
            raise ValueError(f"model.input.rgb must name the red, green and blue bands among bands {self.bands}, "
                             f"got {self.rgb}")
        if self.stats not in STATS_SOURCES:
            raise ValueError(f"model.input.stats must be one of {STATS_SOURCES}, got {self.stats!r}")
        if self.stats_images < 1:
            raise ValueError(f"model.input.stats_images must be >= 1, got {self.stats_images}")
        if (self.mean or self.std) and not len(self.mean) == len(self.std) == len(self.bands):
            raise ValueError(f"model.input.mean and std need one value per band {self.bands}, "
                             f"got {len(self.mean)} and {len(self.std)}")

    @classmethod
    def parse(cls, options: dict[str, Any]) -> "MultispectralInput":
        """From a recipe's ``model.input`` mapping; unknown keys fail naming the closest one."""
        return config_lib.from_dict(cls, options, where="model.input")

    def reader_options(self) -> dict[str, Any]:
        """``preprocess.reader`` of the adapted tower (JSON-safe, only what is set)."""
        options: dict[str, Any] = {"name": "geotiff", "bands": list(self.bands)}
        if self.file_band_names:
            options["file_band_names"] = list(self.file_band_names)
        if self.nodata is not None:
            options["nodata"] = self.nodata
        return options


def training_band_stats(spec: MultispectralInput, paths: list[str]) -> BandStats:
    """Band statistics over up to ``spec.stats_images`` of ``paths`` (unreadable files skipped)."""
    if not paths:
        raise ValueError("model.input.stats=data needs training images, but data.train has none")
    count = min(spec.stats_images, len(paths))
    chosen = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, count).round().astype(int)]
    reader = GeoTiffReader(spec.bands, file_band_names=spec.file_band_names or None, nodata=spec.nodata)
    images = [image for image in (reader.read(path, skip_unreadable=True) for path in chosen) if image is not None]
    if not images:
        raise ValueError(f"model.input.stats=data: none of the {count} training images read could be opened "
                         f"(first: {chosen[0]})")
    if len(images) < count:  # counted here; the loader lists each one in bad_inputs.json
        logging.getLogger("domainclip.multispectral").warning(
            "band statistics: %d of %d sampled training images could not be read and were left out",
            count - len(images), count)
    return BandStats.from_images(images)


@register_input_adapter("multispectral")
class MultispectralAdapter:
    """Widens the vision tower to ``bands`` and makes its preprocessing read GeoTIFFs."""

    def resolve(self, options: dict[str, Any], records: Any) -> dict[str, Any]:
        """Fill in ``mean``/``std`` from the training records (``stats: data``) or torchgeo."""
        spec = MultispectralInput.parse(options)
        if spec.mean:
            return config_lib.to_dict(spec)
        if spec.stats == "given":
            raise ValueError("model.input.stats=given needs mean and std (one value per band)")
        if spec.stats == "torchgeo":
            stats = BandStats.from_torchgeo(spec.bands)
        else:
            if records is None:
                raise ValueError("model.input.stats=data needs a data.train with a record list; a webdataset stream "
                                 "has none: give mean and std, or stats: torchgeo")
            stats = training_band_stats(spec, [record.image for record in records])
        spec.mean, spec.std = [float(v) for v in stats.mean], [float(v) for v in stats.std]
        return config_lib.to_dict(spec)

    def apply(self, backbone: Backbone, options: dict[str, Any]) -> Backbone:
        """Adapt ``backbone`` in place (needs resolved ``mean``/``std``)."""
        spec = MultispectralInput.parse(options)
        if not spec.mean and spec.stats == "torchgeo":
            spec = MultispectralInput.parse(self.resolve(options, None))
        if not spec.mean:
            raise ValueError(f"model.input (stats={spec.stats!r}) has no mean/std yet: `domainclip train` computes "
                             f"them from data.train; elsewhere give mean and std, or stats: torchgeo")
        return adapt_vision_tower(backbone, spec.bands, spec.rgb, spec.mean, spec.std, reader=spec.reader_options())


class GeoTiffReader:
    """Picklable ``path -> (C, H, W)`` float32 tensor of the named bands, in the file's units.

    Invalid pixels (nodata, NaN) take the band's ``fill`` value (the preprocessing mean, so they
    normalise to 0 and carry no signal).
    """

    def __init__(self, bands: list[str], fill: tuple[float, ...] | None = None,
                 file_band_names: list[str] | None = None, nodata: float | None = None) -> None:
        self.bands = list(bands)
        self.fill = np.zeros(len(bands), np.float32) if fill is None else np.asarray(fill, np.float32)
        self.file_band_names = file_band_names
        self.nodata = nodata

    def read(self, path: str | os.PathLike[str], skip_unreadable: bool = False):  # noqa: ANN201
        """The ``MultiBandImage`` (None for an unreadable file when ``skip_unreadable``)."""
        try:
            return read_geotiff(path, self.bands, self.file_band_names, self.nodata)
        except KeyError as error:  # a band the file lacks: the recipe is wrong, not the file
            raise ValueError(f"{error.args[0]} (model.input.bands asks for {self.bands})") from None
        except ValueError:
            raise
        except Exception as error:  # rasterio I/O errors, missing files
            if skip_unreadable:
                return None
            reason = "file not found" if not os.path.exists(path) else f"cannot read GeoTIFF: {type(error).__name__}: {error}"
            raise BadImageError(reason) from error

    def __call__(self, path: str | os.PathLike[str]) -> torch.Tensor:
        image = self.read(path)
        filled = np.where(image.valid, image.array, self.fill[:, None, None]).astype(np.float32)
        return torch.from_numpy(filled)


@register_image_reader("geotiff")
def build_geotiff_reader(preprocess: PreprocessConfig, bands: list[str], file_band_names: list[str] | None = None,
                         nodata: float | None = None) -> GeoTiffReader:
    """The ``geotiff`` reader of a preprocessing (one ``mean`` per band)."""
    if len(bands) != preprocess.channels:
        raise ValueError(f"preprocess.reader has {len(bands)} bands {bands} but mean/std have {preprocess.channels}")
    return GeoTiffReader(bands, preprocess.mean, file_band_names, nodata)

"""torchgeo's scene classification data sets (EuroSAT, UC Merced, RESISC45) mapped onto kit samples.

torchgeo is the optional extra ``geo`` (``pip install 'domainclip[geo]'``); it is imported only
when one of these classes is used, with an error saying how to install it. ``download=False`` by
default: the data must already be under ``root`` in torchgeo's layout; ``download=True`` lets
torchgeo fetch it (only when the user asks and is online).

``TorchGeoScenes(name, root, split)`` gives ``{"image", "label", "class_name", "path"}`` samples:
``image`` is torchgeo's float tensor (RGB sets: 0..255 scaled to [0, 1]; EuroSAT: the raw
Sentinel-2 reflectances of the chosen ``bands``, unscaled -- normalise them with
``multispectral.BandStats``). ``class_name`` is normalised (``AnnualCrop`` -> "annual crop land").
The RGB sets also register data formats (``format: torchgeo_ucmerced`` / ``torchgeo_resisc45``,
``path`` = the torchgeo root) so recipes can train and evaluate on them through the core loop.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from domainclip.core.data.records import ImageTextRecord, RecordSet, captions_from_templates
from domainclip.core.data.sources import DataSourceConfig, register_format

from ..prompts import OVERHEAD_TEMPLATES, normalise_class_name

Sample = dict[str, Any]


@dataclass(frozen=True)
class TorchGeoSet:
    """One torchgeo data set: its class name and whether its pixels are 8-bit RGB."""

    class_name: str
    rgb: bool


TORCHGEO_SETS = {
    "eurosat": TorchGeoSet("EuroSAT", rgb=False),
    "ucmerced": TorchGeoSet("UCMerced", rgb=True),
    "resisc45": TorchGeoSet("RESISC45", rgb=True),
}


def import_torchgeo() -> Any:
    """``torchgeo.datasets``, or an ImportError saying how to install the ``geo`` extra."""
    try:
        import torchgeo.datasets as datasets
    except ImportError as error:
        raise ImportError("torchgeo is not installed; the torchgeo scene data sets need the optional extra: "
                          "pip install 'domainclip[geo]' (torchgeo, rasterio)") from error
    return datasets


class TorchGeoScenes(torch.utils.data.Dataset):
    """A torchgeo scene data set whose samples carry the kit's keys and class names.

    Args:
        name: ``eurosat``, ``ucmerced`` or ``resisc45``.
        root: torchgeo's root folder for that data set.
        split: ``train``, ``val`` or ``test`` (torchgeo's split files).
        bands: EuroSAT only: Sentinel-2 band names (``("B04", "B03", "B02")``); default all 13.
        transforms: optional ``sample -> sample`` callable run on the kit sample.
        download: let torchgeo download the data (off by default; needs network).
    """

    def __init__(self, name: str, root: str, split: str = "train", bands: Sequence[str] | None = None,
                 transforms: Callable[[Sample], Sample] | None = None, download: bool = False) -> None:
        if name not in TORCHGEO_SETS:
            raise ValueError(f"unknown torchgeo scene data set {name!r}; valid: {sorted(TORCHGEO_SETS)}")
        datasets = import_torchgeo()
        spec = TORCHGEO_SETS[name]
        kwargs: dict[str, Any] = {"root": str(root), "split": split, "download": download}
        if bands is not None:
            if spec.rgb:
                raise ValueError(f"{name} is an RGB data set; 'bands' applies to eurosat only")
            kwargs["bands"] = tuple(bands)
        try:
            self.dataset = getattr(datasets, spec.class_name)(**kwargs)
        except datasets.DatasetNotFoundError as error:
            raise FileNotFoundError(f"{spec.class_name} not found under '{root}' (split {split!r}); put it there "
                                    f"in torchgeo's layout or pass download=True when online: {error}") from error
        self.name = name
        self.rgb = spec.rgb
        self.raw_class_names = list(self.dataset.classes)
        self.class_names = [normalise_class_name(raw) for raw in self.raw_class_names]
        self.band_names = list(bands) if bands is not None else list(getattr(self.dataset, "bands", ("R", "G", "B")))
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        raw = self.dataset[index]
        image = raw["image"].float()
        if self.rgb:
            image = image / 255.0
        label = int(raw["label"])
        sample = {"image": image, "label": label, "class_name": self.class_names[label],
                  "path": self.dataset.samples[index][0]}
        return self.transforms(sample) if self.transforms is not None else sample

    def record_set(self, templates: Sequence[str] = OVERHEAD_TEMPLATES,
                   class_names: Mapping[str, str] | None = None) -> RecordSet:
        """The split as kit records (captions = templates on the class name) for the core loop.

        ``class_names`` (``{raw name: phrase}``, a recipe's ``data.class_names``) replaces the
        normalised phrase of those classes; a key that is no class of the data set is an error."""
        overrides = dict(class_names or {})
        unknown = sorted(set(overrides) - set(self.raw_class_names))
        if unknown:
            raise ValueError(f"class_names keys {unknown} are not classes of {self.name}; valid keys: "
                             f"{self.raw_class_names}")
        names = [overrides.get(raw, name) for raw, name in zip(self.raw_class_names, self.class_names)]
        captions = [captions_from_templates(name, list(templates)) for name in names]
        records = [ImageTextRecord(os.fspath(path), list(captions[label]), int(label))
                   for path, label in self.dataset.samples]
        return RecordSet(records, names, list(self.raw_class_names))


def _register_rgb_format(name: str) -> None:
    @register_format(f"torchgeo_{name}")
    def load(cfg: DataSourceConfig) -> RecordSet:
        templates = cfg.templates if cfg.templates != DataSourceConfig().templates else OVERHEAD_TEMPLATES
        return TorchGeoScenes(name, cfg.path, cfg.split or "train").record_set(templates, cfg.class_names)


for _name, _spec in TORCHGEO_SETS.items():
    if _spec.rgb:
        _register_rgb_format(_name)

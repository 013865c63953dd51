"""Overhead-imagery prompt templates and scene class-name normalisation.

Scene data sets name their classes as glued lower-case words (RSICD ``denseresidential``,
RESISC45 ``ground_track_field``, UC Merced ``mediumresidential``). CLIP-style text towers read
natural phrases better, so :func:`normalise_class_name` turns a raw name into one:

1. the curated table :data:`SCENE_CLASS_NAMES` (the 30 RSICD classes, the same mapping as
   ``recipes/base/compact_base.yaml``, plus the other UC Merced / RESISC45 / EuroSAT names), looked
   up after lower-casing and removing ``_``, ``-`` and spaces, so ``Dense_Residential``,
   ``dense-residential`` and ``denseresidential`` all map to "dense residential area";
2. otherwise a readable form: ``_``/``-`` become spaces, CamelCase is split
   (``ParkingGarage`` -> "parking garage"), lower-cased.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

# The 30 RSICD scene classes (file-name prefixes) -> their names in prompts.
RSICD_CLASS_NAMES: dict[str, str] = {
    "airport": "airport", "bareland": "bare land", "baseballfield": "baseball field", "beach": "beach",
    "bridge": "bridge", "center": "city center", "church": "church", "commercial": "commercial area",
    "denseresidential": "dense residential area", "desert": "desert", "farmland": "farmland",
    "forest": "forest", "industrial": "industrial area", "meadow": "meadow",
    "mediumresidential": "medium residential area", "mountain": "mountain", "park": "park",
    "parking": "parking lot", "playground": "playground", "pond": "pond", "port": "port",
    "railwaystation": "railway station", "resort": "resort", "river": "river", "school": "school",
    "sparseresidential": "sparse residential area", "square": "square", "stadium": "stadium",
    "storagetanks": "storage tanks", "viaduct": "viaduct",
}

# Other scene data sets' glued names (keys without separators, lower case).
OTHER_CLASS_NAMES: dict[str, str] = {
    "agricultural": "agricultural land", "baseballdiamond": "baseball diamond", "buildings": "buildings",
    "chaparral": "chaparral", "freeway": "freeway", "golfcourse": "golf course", "harbor": "harbor",
    "intersection": "intersection", "mobilehomepark": "mobile home park", "overpass": "overpass",
    "parkinglot": "parking lot", "runway": "runway", "tenniscourt": "tennis court",
    "groundtrackfield": "ground track field", "thermalpowerstation": "thermal power station",
    "basketballcourt": "basketball court", "circularfarmland": "circular farmland",
    "rectangularfarmland": "rectangular farmland", "seaice": "sea ice", "snowberg": "snowberg",
    "terrace": "terrace", "annualcrop": "annual crop land", "permanentcrop": "permanent crop land",
    "herbaceousvegetation": "herbaceous vegetation", "highway": "highway", "pasture": "pasture",
    "residential": "residential area", "sealake": "sea or lake", "boeing": "airplane", "airplane": "airplane",
    "storagetank": "storage tank", "railway": "railway", "denseresidential": "dense residential area",
}

SCENE_CLASS_NAMES: dict[str, str] = {**OTHER_CLASS_NAMES, **RSICD_CLASS_NAMES}

OVERHEAD_TEMPLATES: list[str] = [
    "an aerial image of a {}.",
    "a satellite photo of a {}.",
    "an overhead view of a {}.",
    "a remote sensing image of a {}.",
    "an aerial photograph showing a {}.",
    "a top-down satellite view of a {}.",
]
"""Prompt ensemble for overhead scenes (the first three are the compact base recipes' templates)."""


def _key(raw: str) -> str:
    return re.sub(r"[\s_\-]+", "", raw).lower()


def normalise_class_name(raw: str, extra: dict[str, str] | None = None) -> str:
    """Natural-language name of a raw scene class name (see the module docstring for the rules)."""
    table = {**SCENE_CLASS_NAMES, **{_key(k): v for k, v in (extra or {}).items()}}
    key = _key(raw)
    if not key:
        raise ValueError(f"class name {raw!r} is empty")
    if key in table:
        return table[key]
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", raw.strip())
    return " ".join(re.split(r"[\s_\-]+", spaced)).lower()


def class_name_map(raw_names: Iterable[str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """``{raw: natural}`` for every raw name: the ``class_names`` value of a data source."""
    return {raw: normalise_class_name(raw, extra) for raw in raw_names}

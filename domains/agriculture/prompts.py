"""Leaf-disease class names in natural language, split into crop and disease, and prompt templates.

PlantVillage names its classes ``<Crop>___<Disease>`` (``Apple___Cedar_apple_rust``,
``Corn_(maize)___Common_rust_``, ``Tomato___healthy``). A CLIP-style text tower reads a natural
noun phrase better, and a user may want to classify by crop or by disease alone, so each raw name
is parsed into a :class:`LeafClass` with three phrases:

* ``full``: "an apple leaf with cedar apple rust"; healthy classes: "a healthy apple leaf";
* ``crop``: "an apple leaf" (every disease of one crop is one class);
* ``disease``: "a leaf with cedar apple rust" / "a healthy leaf" (one disease across crops is one
  class: ``Apple___Black_rot`` and ``Grape___Black_rot`` are both "a leaf with black rot").

Crop and disease words come from the curated tables :data:`CROP_NAMES` and
:data:`DISEASE_NAMES` (all 38 PlantVillage classes); other names are made readable by rule
(``_`` -> space, lower case, a trailing ``_`` or a ``(...)`` aside dropped).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from domainclip.core.data.records import captions_from_templates

SEPARATOR = "___"
ATTRIBUTES = ("full", "crop", "disease")
HEALTHY = "healthy"

# PlantVillage crop folder prefixes -> crop words used in prompts.
CROP_NAMES: dict[str, str] = {
    "Apple": "apple", "Blueberry": "blueberry", "Cherry_(including_sour)": "cherry", "Corn_(maize)": "corn",
    "Grape": "grape", "Orange": "orange", "Peach": "peach", "Pepper,_bell": "bell pepper", "Potato": "potato",
    "Raspberry": "raspberry", "Soybean": "soybean", "Squash": "squash", "Strawberry": "strawberry",
    "Tomato": "tomato",
}

# PlantVillage disease suffixes -> disease words (without the crop where the name repeats it).
DISEASE_NAMES: dict[str, str] = {
    "Apple_scab": "apple scab", "Black_rot": "black rot", "Cedar_apple_rust": "cedar apple rust",
    "Powdery_mildew": "powdery mildew", "Cercospora_leaf_spot Gray_leaf_spot": "gray leaf spot",
    "Common_rust_": "common rust", "Northern_Leaf_Blight": "northern leaf blight",
    "Esca_(Black_Measles)": "esca (black measles)", "Leaf_blight_(Isariopsis_Leaf_Spot)": "leaf blight",
    "Haunglongbing_(Citrus_greening)": "citrus greening", "Bacterial_spot": "bacterial spot",
    "Early_blight": "early blight", "Late_blight": "late blight", "Leaf_scorch": "leaf scorch",
    "Leaf_Mold": "leaf mold", "Septoria_leaf_spot": "septoria leaf spot",
    "Spider_mites Two-spotted_spider_mite": "two-spotted spider mites", "Target_Spot": "target spot",
    "Tomato_Yellow_Leaf_Curl_Virus": "tomato yellow leaf curl virus", "Tomato_mosaic_virus": "tomato mosaic virus",
    "healthy": HEALTHY,
}

LEAF_TEMPLATES: list[str] = [
    "a photo of {}.",
    "a close-up photo of {}.",
    "a field photo of {}.",
    "a cropped photo of {}.",
    "a plant disease photo of {}.",
]
"""Prompt ensemble: every attribute phrase is a noun phrase ("an apple leaf with black rot")."""


def readable(raw: str) -> str:
    """Rule-based readable form: drop ``(...)`` asides, ``_`` -> space, collapse spaces, lower case."""
    text = re.sub(r"\([^)]*\)", " ", raw)
    return " ".join(text.replace("_", " ").replace(",", " ").split()).lower()


def article(phrase: str) -> str:
    """``phrase`` with "a" or "an" in front (by its first letter)."""
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


@dataclass(frozen=True)
class LeafClass:
    """One raw class name parsed into crop and disease (``disease == "healthy"`` for healthy leaves)."""

    raw: str
    crop: str
    disease: str

    @property
    def healthy(self) -> bool:
        return self.disease == HEALTHY

    def phrase(self, attribute: str = "full") -> str:
        """The noun phrase of this class for ``attribute`` (full, crop or disease)."""
        if attribute == "full":
            return article(f"healthy {self.crop} leaf") if self.healthy else article(f"{self.crop} leaf with {self.disease}")
        if attribute == "crop":
            return article(f"{self.crop} leaf")
        if attribute == "disease":
            return "a healthy leaf" if self.healthy else f"a leaf with {self.disease}"
        raise ValueError(f"label attribute must be one of {ATTRIBUTES}, got {attribute!r}")

    def key(self, attribute: str) -> str:
        """The class key of this image under ``attribute`` (raw name, crop words or disease words)."""
        if attribute == "full":
            return self.raw
        if attribute in ("crop", "disease"):
            return getattr(self, attribute)
        raise ValueError(f"label attribute must be one of {ATTRIBUTES}, got {attribute!r}")


def parse_class_name(raw: str) -> LeafClass:
    """``Apple___Cedar_apple_rust`` -> ``LeafClass(raw, crop="apple", disease="cedar apple rust")``.

    Raises ``ValueError`` for a name without the ``<Crop>___<Disease>`` separator.
    """
    crop_raw, sep, disease_raw = raw.strip().partition(SEPARATOR)
    if not sep or not crop_raw or not disease_raw:
        raise ValueError(f"class name {raw!r} is not in the PlantVillage layout '<Crop>___<Disease>' "
                         f"(e.g. 'Apple___Black_rot'); rename the folder or label, or use format 'label_csv'/'folders' "
                         f"with class_names")
    crop = CROP_NAMES.get(crop_raw, readable(crop_raw))
    disease = DISEASE_NAMES.get(disease_raw, readable(disease_raw))
    if disease.lower() == HEALTHY:
        disease = HEALTHY
    return LeafClass(raw.strip(), crop, disease)


def class_phrases(raw_names: Iterable[str], attribute: str = "full") -> dict[str, str]:
    """``{class key: phrase}`` under ``attribute`` for the raw names."""
    phrases: dict[str, str] = {}
    for raw in raw_names:
        leaf = parse_class_name(raw)
        phrases[leaf.key(attribute)] = leaf.phrase(attribute)
    return phrases


def leaf_prompts(raw_name: str, attribute: str = "full", templates: Iterable[str] = LEAF_TEMPLATES) -> list[str]:
    """Every template applied to the phrase of one raw class name."""
    return captions_from_templates(parse_class_name(raw_name).phrase(attribute), list(templates))

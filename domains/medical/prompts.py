"""Clinical class names with synonyms, prompt templates, and CheXzero-style prompt pairs.

:data:`FINDINGS` maps the 14 CheXpert / MIMIC-CXR label columns to the phrase used in prompts and
to synonyms that radiology reports use; :func:`clinical_name` maps any of those spellings
(``Pleural Effusion``, ``pleural_effusion``, ``effusion``) to the prompt phrase. Zero-shot
multi-label evaluation (core ``evaluate_multilabel``) scores each finding by its positive prompts
against its negative ones (:data:`POSITIVE_TEMPLATES` / :data:`NEGATIVE_TEMPLATES`, as in
CheXzero: "{finding}" vs "no {finding}").
"""
from __future__ import annotations

import re
from collections.abc import Iterable

# label column -> (prompt phrase, synonyms found in reports)
FINDINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "No Finding": ("no acute cardiopulmonary abnormality", ("normal", "no acute disease", "clear lungs")),
    "Enlarged Cardiomediastinum": ("an enlarged cardiomediastinum", ("widened mediastinum", "mediastinal widening")),
    "Cardiomegaly": ("cardiomegaly", ("enlarged heart", "enlarged cardiac silhouette", "cardiac enlargement")),
    "Lung Opacity": ("a lung opacity", ("opacity", "airspace opacity", "opacities")),
    "Lung Lesion": ("a lung lesion", ("nodule", "mass", "lung mass", "pulmonary nodule")),
    "Edema": ("pulmonary edema", ("edema", "vascular congestion", "fluid overload")),
    "Consolidation": ("consolidation", ("airspace consolidation", "airspace disease")),
    "Pneumonia": ("pneumonia", ("infection", "infectious process", "pneumonic infiltrate")),
    "Atelectasis": ("atelectasis", ("collapse", "volume loss", "atelectatic change")),
    "Pneumothorax": ("a pneumothorax", ("pneumothoraces", "collapsed lung", "air in the pleural space")),
    "Pleural Effusion": ("a pleural effusion", ("effusion", "pleural fluid", "effusions")),
    "Pleural Other": ("a pleural abnormality", ("pleural thickening", "pleural scarring")),
    "Fracture": ("a rib fracture", ("fracture", "fractured rib", "broken rib")),
    "Support Devices": ("support devices", ("tube", "line", "catheter", "pacemaker", "lines and tubes")),
}
CHEXPERT_COLUMNS: list[str] = list(FINDINGS)
CHEXPERT_COMPETITION: list[str] = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]

# Other clinical classes used by the kit's recipes (paediatric pneumonia folders).
CLASS_NAMES: dict[str, str] = {"NORMAL": "clear healthy lungs", "PNEUMONIA": "pneumonia"}

CXR_TEMPLATES: list[str] = [
    "a chest x-ray showing {}.",
    "a chest radiograph with {}.",
    "a frontal chest x-ray with {}.",
]
POSITIVE_TEMPLATES: list[str] = ["{}", "a chest x-ray showing {}.", "findings consistent with {}."]
NEGATIVE_TEMPLATES: list[str] = ["no {}", "a chest x-ray showing no {}.", "no evidence of {}."]

CT_TEMPLATES: list[str] = [
    "an axial CT slice showing {}.",
    "a computed tomography image of {}.",
    "a CT scan slice with {}.",
]


def _key(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text).strip().lower()


def _lookup_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for column, (phrase, synonyms) in FINDINGS.items():
        for spelling in (column, phrase, *synonyms):
            table.setdefault(_key(spelling), phrase)
    return table


_TABLE = _lookup_table()


def clinical_name(raw: str) -> str:
    """Prompt phrase of a finding given as column name, phrase or synonym; else a readable form."""
    key = _key(raw)
    if not key:
        raise ValueError(f"class name {raw!r} is empty")
    return _TABLE.get(key, key)


def finding_phrase(column: str) -> str:
    """Bare finding name for negated prompts ("no {}"): drops a leading article."""
    return re.sub(r"^(a|an|the)\s+", "", clinical_name(column))


def class_name_map(raw_names: Iterable[str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """``{raw: clinical phrase}`` for a data source's ``class_names``; ``extra`` wins."""
    return {raw: (extra or {}).get(raw) or CLASS_NAMES.get(raw) or clinical_name(raw) for raw in raw_names}


def findings_caption(positives: list[str], template: str = "a chest x-ray showing {}.") -> str:
    """One caption listing the positive findings ("a, b and c"); no positive -> "No Finding"."""
    phrases = [clinical_name(p) for p in positives if p != "No Finding"] or [clinical_name("No Finding")]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return template.replace("{}", listed)

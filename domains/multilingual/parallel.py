"""Parallel multilingual captions (Flickr8k + Multi30k layout) and their held-out evaluation split.

``captions.jsonl`` holds one line per image: ``{"image", "split", "captions": {"en": [...],
"de": [...], ...}}``. :func:`load_parallel` keeps the images that have a caption in **every**
asked language (so each language is scored on the same gallery) and one caption per language
(the first; Multi30k's de/fr/cs captions translate one of the five English ones, which one is not
recorded, so ``en`` uses the first English caption).

Held-out split. Multi30k's own test split covers only 31 of the 1,000 images, so evaluation uses
the core hash hold-out (``core/data/sources.py`` ``in_holdout``): an image is held out when its
file-name hash is below ``holdout_fraction``. 0.2 (the default) is exactly the hold-out the
compact base excluded from its Flickr8k training captions (recipes/base/compact_base.yaml), so
the compact base never saw these images; it holds 186 images, 175 of them with all four languages
(the 11 others are counted as skipped).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from domainclip.core.data.records import ImageTextRecord, RecordSet
from domainclip.core.data.sources import in_holdout, wanted_splits

DEFAULT_LANGUAGES = ("en", "de", "fr", "cs")


@dataclass
class ParallelCaptions:
    """Images and one caption per image per language (``captions[lang][i]`` describes ``images[i]``)."""

    images: list[str]
    captions: dict[str, list[str]]
    skipped: int = 0

    @property
    def languages(self) -> list[str]:
        return list(self.captions)

    def record_set(self, language: str) -> RecordSet:
        """The images with their ``language`` captions as kit records (for the core loaders)."""
        return RecordSet([ImageTextRecord(image, [caption]) for image, caption in
                          zip(self.images, self.captions[language])])


def load_parallel(path: str | os.PathLike[str], languages: tuple[str, ...] | list[str] = DEFAULT_LANGUAGES,
                  holdout: str = "test", holdout_fraction: float = 0.2, split: str = "") -> ParallelCaptions:
    """Read ``captions.jsonl`` (or its folder): images with captions in all ``languages``.

    Args:
        holdout: ``test`` keeps the hash hold-out, ``train`` the rest, ``""`` everything.
        split: keep only these ``split`` values (comma-separated; ``""`` = all).
    """
    manifest = Path(path).expanduser()
    if manifest.is_dir():
        manifest = manifest / "captions.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"parallel captions not found: '{manifest}' (expected captions.jsonl)")
    if holdout not in ("", "train", "test") or not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout must be '', 'train' or 'test' and holdout_fraction in [0, 1), "
                         f"got {holdout!r} and {holdout_fraction}")
    if not languages:
        raise ValueError("languages is empty: name at least one caption language (e.g. ['en', 'de'])")
    splits = wanted_splits(split)
    images: list[str] = []
    captions: dict[str, list[str]] = {lang: [] for lang in languages}
    skipped = 0
    with open(manifest, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{manifest}:{number}: not valid JSON ({error.msg})") from error
            if not isinstance(row, dict) or "image" not in row or not isinstance(row.get("captions"), dict):
                raise ValueError(f"{manifest}:{number}: expected {{'image', 'captions': {{lang: [...]}}}}")
            if splits and str(row.get("split", "")) not in splits:
                continue
            if holdout and in_holdout(row["image"], holdout_fraction) != (holdout == "test"):
                continue
            first = {lang: _first_caption(row["captions"].get(lang)) for lang in languages}
            if any(not caption for caption in first.values()):
                skipped += 1
                continue
            images.append(str(manifest.parent / row["image"]))
            for lang, caption in first.items():
                captions[lang].append(caption)
    if not images:
        raise ValueError(f"{manifest}: no image has captions in all of {list(languages)} "
                         f"(split={split!r}, holdout={holdout!r}, holdout_fraction={holdout_fraction})")
    return ParallelCaptions(images, captions, skipped)


def _first_caption(value: object) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0].strip()
    return ""

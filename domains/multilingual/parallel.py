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

A new language is data only: ``path`` may also be a list of such files, or a folder whose
``captions.jsonl`` and ``captions.<anything>.jsonl`` files are all read (e.g. ``captions.zh.jsonl``
with rows ``{"image": ..., "captions": {"zh": [...]}}``); rows of the same image (resolved path)
are merged across files. A row without a ``split`` key takes the split of the same image's row in
another file (the main ``captions.jsonl``), so ``split="train"`` keeps the added language's train
images. Files may start with a UTF-8 byte-order mark. :func:`~.tokenization.tokenizer_coverage`
then reports how much of each language a text tower's tokenizer knows.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
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
    skipped_images: list[tuple[str, str]] = field(default_factory=list)
    """``(image, reason)`` for every skipped image (a language missing, or no split known)."""

    @property
    def languages(self) -> list[str]:
        return list(self.captions)

    def record_set(self, language: str) -> RecordSet:
        """The images with their ``language`` captions as kit records (for the core loaders)."""
        return RecordSet([ImageTextRecord(image, [caption]) for image, caption in
                          zip(self.images, self.captions[language])])


def caption_files(path: str | os.PathLike[str] | list[str | os.PathLike[str]] | tuple) -> list[Path]:
    """The caption files behind ``path``: a file, a list of files, or a folder's ``captions.jsonl``
    plus its ``captions.*.jsonl`` (one per added language)."""
    if isinstance(path, (list, tuple)):
        if not path:
            raise ValueError("parallel captions: the list of caption files is empty")
        files = [Path(p).expanduser() for p in path]
    else:
        folder = Path(path).expanduser()
        files = sorted(folder.glob("captions*.jsonl")) if folder.is_dir() else [folder]
        if folder.is_dir() and not files:
            raise FileNotFoundError(f"parallel captions not found: '{folder}' has no captions.jsonl "
                                    f"(or captions.<lang>.jsonl) file")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"parallel captions not found: '{file}' (expected a captions JSONL file)")
    return files


def _read_rows(manifest: Path) -> list[tuple[str, str, dict[str, object], str | None]]:
    """The rows of one caption file as ``(resolved image path, image as written, captions by
    language, split)``; split is ``None`` for a row without a ``split`` key."""
    rows: list[tuple[str, str, dict[str, object], str | None]] = []
    # utf-8-sig: a byte-order mark (written by some Windows editors) is not part of the first row
    with open(manifest, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{manifest}:{number}: not valid JSON ({error.msg})") from error
            if not isinstance(row, dict) or "image" not in row or not isinstance(row.get("captions"), dict):
                raise ValueError(f"{manifest}:{number}: expected {{'image', 'captions': {{lang: [...]}}}}")
            image = os.path.normpath(str(manifest.parent / row["image"]))
            split = str(row["split"]).strip() if "split" in row else None
            rows.append((image, str(row["image"]), row["captions"], split))
    return rows


def load_parallel(path: str | os.PathLike[str] | list[str | os.PathLike[str]],
                  languages: tuple[str, ...] | list[str] = DEFAULT_LANGUAGES, holdout: str = "test",
                  holdout_fraction: float = 0.2, split: str = "") -> ParallelCaptions:
    """Read parallel captions: images with captions in all ``languages``.

    Args:
        path: ``captions.jsonl``, a list of caption files (one per language, say), or a folder
            (its ``captions.jsonl`` and ``captions.*.jsonl``); rows are merged by image.
        holdout: ``test`` keeps the hash hold-out, ``train`` the rest, ``""`` everything.
        split: keep only these ``split`` values (comma-separated; ``""`` = all). A row without a
            ``split`` key (an added-language file) takes the split of the same image's row in
            another file (the main ``captions.jsonl``); an image that no row gives a split is
            skipped under a split filter and listed in ``skipped_images``.
    """
    files = caption_files(path)
    if holdout not in ("", "train", "test") or not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout must be '', 'train' or 'test' and holdout_fraction in [0, 1), "
                         f"got {holdout!r} and {holdout_fraction}")
    if not languages:
        raise ValueError("languages is empty: name at least one caption language (e.g. ['en', 'de'])")
    file_rows = [_read_rows(manifest) for manifest in files]
    # the split of each image, from the rows that state one (first file first)
    image_split: dict[str, str] = {}
    for rows_of_file in file_rows:
        for image, _, _, row_split in rows_of_file:
            if row_split is not None:
                image_split.setdefault(image, row_split)
    splits = wanted_splits(split)
    rows: dict[str, dict[str, object]] = {}
    skipped_images: list[tuple[str, str]] = []
    no_split: set[str] = set()
    for rows_of_file in file_rows:
        for image, written, by_language, row_split in rows_of_file:
            if splits:
                row_split = image_split.get(image) if row_split is None else row_split
                if row_split is None:
                    if image not in no_split:
                        no_split.add(image)
                        skipped_images.append((image, f"no row gives it a 'split' (asked split={split!r})"))
                    continue
                if row_split not in splits:
                    continue
            if holdout and in_holdout(written, holdout_fraction) != (holdout == "test"):
                continue
            merged = rows.setdefault(image, {})
            for lang, value in by_language.items():
                if _first_caption(value) and not merged.get(lang):
                    merged[lang] = value
    images: list[str] = []
    captions: dict[str, list[str]] = {lang: [] for lang in languages}
    for image, by_language in rows.items():
        first = {lang: _first_caption(by_language.get(lang)) for lang in languages}
        missing = [lang for lang, caption in first.items() if not caption]
        if missing:
            skipped_images.append((image, f"no caption in {missing}"))
            continue
        images.append(image)
        for lang, caption in first.items():
            captions[lang].append(caption)
    if not images:
        found = sorted({lang for by_language in rows.values() for lang in by_language})
        raise ValueError(f"{', '.join(map(str, files))}: no image has captions in all of {list(languages)} "
                         f"(languages found: {found}; split={split!r}, holdout={holdout!r}, "
                         f"holdout_fraction={holdout_fraction}; {len(skipped_images)} images skipped)")
    return ParallelCaptions(images, captions, len(skipped_images), skipped_images)


def _first_caption(value: object) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0].strip()
    return ""

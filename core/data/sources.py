"""Read a data source's manifest into a ``RecordSet`` (image paths + captions + labels).

``load_records(cfg)`` dispatches on ``cfg.format`` through ``FORMAT_LOADERS``; each format is
one function registered with ``@register_format("name")``. Images are never opened here: data
sets can hold millions of them, and unreadable ones are reported later by the dataset.

Choices (documented here because ``DataSourceConfig``'s docstring is shared with the config):

* Relative image paths start at ``image_root``; when it is empty, at the manifest's folder.
  Absolute paths are kept as they are.
* ``split`` may name several splits separated by commas (``"train,restval"`` for COCO-style
  Karpathy files). A manifest without a ``split`` column and a non-empty ``split`` is an error,
  not a silent "keep everything".
* karpathy: when ``image_root`` is empty, the first of ``<json folder>/images``, any
  ``<json folder>/*_images`` folder (sorted; RSICD keeps its images in ``RSICD_images/``) and
  the JSON's folder itself that holds the first record's file; if none does, ``images/`` when it
  exists, else the JSON's folder (missing files then show up as bad items when loading).
  A record's ``filepath`` (COCO releases) is joined in front of its ``filename``.
* folders: ``path`` is the root holding one folder per class; when ``split`` is set,
  ``path/<split>`` is the root (``chest_xray/{train,test}/<class>``) and must be a folder.
  ``image_root`` is not used. Files that are not images and sub-folders inside class folders
  are listed in ``RecordSet.skipped``.
* label_csv: the image column is ``image_key`` when the CSV has it, else ``path``; the label
  column is ``label_key`` when set, else ``label``.
* csv / jsonl / parquet: ``caption_key`` may be a dotted path into nested JSON objects
  (``captions.en`` for ``{"captions": {"en": [...]}}``). When ``label_key`` is set and the
  caption column is absent, or a row's caption is empty, the captions come from ``templates``
  applied to the row's class name. A row with neither caption nor label is skipped and listed
  in ``RecordSet.skipped``; if no row at all has a caption, loading fails naming the first row.
* Class numbering (sorted raw names, see ``records.py``) uses the labels of **all** rows of a
  manifest, before the split filter, plus the keys of ``class_names``; so train/val/test rows of
  one manifest share indices. Separate files per split (label CSVs, folders) share indices when
  they hold the same classes or when ``class_names`` lists them all.
* ``limit`` keeps the first N records after split filtering.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import ImageTextRecord, RecordSet, build_class_index, captions_from_templates
from ..plugins import require_registered

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class DataSourceConfig:
    """Where one split's images and captions come from.

    Attributes:
        format: csv | jsonl | parquet | karpathy | folders | label_csv | webdataset.
        path: manifest file, Karpathy JSON, class-folder root, label CSV, or a shard pattern
            such as ``shards/train-{0000..0099}.tar`` (brace expansion) for webdataset.
        image_root: folder that relative image paths start from (default: the manifest's folder;
            for karpathy: the first of ``images/``, ``*_images/`` (e.g. RSICD's ``RSICD_images/``) and the
            JSON's folder that holds the first image, each image at ``filepath/filename``).
        split: Karpathy split name ("train", "val", "test"), or for manifests the value of the
            ``split`` column to keep ("" keeps all rows).
        image_key: manifest column with the image path.
        caption_key: manifest column with the caption(s): a string, or a list in JSONL/Parquet.
        caption_separator: split one CSV caption cell into several captions on this string.
        label_key: manifest/label-CSV column with the class name ("" = no labels).
        group_key: csv, jsonl, parquet, label_csv and ct_slices: column with a group id per image
            (rows with the same id are views of one object, e.g. the slices of one scan) for
            group-level evaluation (``eval[].groups``); "" = none. Use ids that identify no person.
        class_names: map from raw class name to its natural-language name used in captions.
        templates: prompt templates with one ``{}`` turning a class name into a caption.
        num_samples: webdataset only: samples in one epoch (streams have no length).
        limit: keep only the first N records (0 = all); for smoke tests.
        shots: k-shot protocol: keep ``shots`` records per class, drawn with ``shot_seed``
            (0 = all records). Unlabelled records are left out.
        shot_seed: seed of the k-shot draw (results are reported as mean and std over seeds).
        class_subset: base-to-novel protocol: ``base`` keeps the first half of the classes (in
            class-index order, rounded up), ``novel`` the rest, ``""`` all; labels are renumbered
            within the subset.
        holdout: carve a deterministic hold-out from data without a usable split: ``test`` keeps
            the records whose image file name hashes below ``holdout_fraction``, ``train`` keeps
            the others, ``""`` keeps all. The same file always lands on the same side.
        holdout_fraction: share of the records in the hold-out (by file-name hash).
    """
    format: str = "csv"
    path: str = ""
    image_root: str = ""
    split: str = ""
    image_key: str = "image"
    caption_key: str = "caption"
    caption_separator: str = ""
    label_key: str = ""
    group_key: str = ""
    class_names: dict[str, str] = field(default_factory=dict)
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    num_samples: int = 0
    limit: int = 0
    shots: int = 0
    shot_seed: int = 0
    class_subset: str = ""
    holdout: str = ""
    holdout_fraction: float = 0.0


class MissingColumnError(KeyError, ValueError):
    """A manifest lacks a column the config names (catch it as KeyError or ValueError)."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0])


RecordLoader = Callable[[DataSourceConfig], RecordSet]
FORMAT_LOADERS: dict[str, RecordLoader] = {}
STREAM_FORMATS = ("webdataset",)


def register_format(name: str) -> Callable[[RecordLoader], RecordLoader]:
    """Decorator adding a ``cfg -> RecordSet`` loader for ``cfg.format == name``."""

    def register(loader: RecordLoader) -> RecordLoader:
        FORMAT_LOADERS[name] = loader
        return loader

    return register


def valid_formats() -> list[str]:
    """Every format name a ``DataSourceConfig`` may use."""
    return sorted([*FORMAT_LOADERS, *STREAM_FORMATS])


def check_format(fmt: str) -> None:
    """Raise ``ValueError`` naming an unknown format, the valid ones and the closest match."""
    require_registered(fmt, valid_formats, f"unknown data format {fmt!r} (config key 'format')", valid="valid formats")


def load_records(cfg: DataSourceConfig) -> RecordSet:
    """Read the manifest ``cfg`` points to (never the images) and return its records."""
    check_format(cfg.format)
    if cfg.format in STREAM_FORMATS:
        raise ValueError(
            f"format {cfg.format!r} is a stream of tar shards without a record list; "
            "build it with domainclip.core.data.build_webdataset(cfg, ...) instead of load_records"
        )
    if cfg.limit < 0:
        raise ValueError(f"limit must be >= 0 (0 keeps all records), got {cfg.limit}")
    if cfg.class_subset not in CLASS_SUBSETS:
        raise ValueError(f"class_subset must be one of {CLASS_SUBSETS}, got {cfg.class_subset!r}")
    if cfg.shots < 0:
        raise ValueError(f"shots must be >= 0 (0 keeps all records), got {cfg.shots}")
    if cfg.holdout not in ("", "train", "test") or not 0.0 <= cfg.holdout_fraction < 1.0:
        raise ValueError(f"holdout must be '', 'train' or 'test' and holdout_fraction in [0, 1), "
                         f"got {cfg.holdout!r} and {cfg.holdout_fraction}")
    record_set = FORMAT_LOADERS[cfg.format](cfg)
    if cfg.holdout:
        record_set.records = [r for r in record_set.records
                              if in_holdout(r.image, cfg.holdout_fraction) == (cfg.holdout == "test")]
    if cfg.class_subset:
        record_set = select_class_subset(record_set, cfg.class_subset, cfg.path)
    if cfg.shots:
        record_set = select_shots(record_set, cfg.shots, cfg.shot_seed, cfg.path)
    if cfg.limit:
        record_set.records = record_set.records[: cfg.limit]
    return record_set


CLASS_SUBSETS = ("", "base", "novel")


def in_holdout(image: str, fraction: float) -> bool:
    """Whether an image file belongs to the hash hold-out (depends on its file name only)."""
    digest = hashlib.sha1(Path(image).name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def select_class_subset(record_set: RecordSet, subset: str, source: str) -> RecordSet:
    """The base (first half, rounded up) or novel (second half) classes, labels renumbered."""
    if not record_set.class_names:
        raise ValueError(f"class_subset={subset!r} needs labelled data, but {source} has no classes")
    count = len(record_set.class_names)
    split = math.ceil(count / 2)
    kept = range(0, split) if subset == "base" else range(split, count)
    renumber = {old: new for new, old in enumerate(kept)}
    records = [dataclasses.replace(r, label=renumber[r.label]) for r in record_set.records if r.label in renumber]
    return RecordSet(records, [record_set.class_names[i] for i in kept],
                     [record_set.raw_class_names[i] for i in kept] if record_set.raw_class_names else [],
                     record_set.skipped)


def select_shots(record_set: RecordSet, shots: int, seed: int, source: str) -> RecordSet:
    """``shots`` records per class drawn with ``seed``, in their original order."""
    if not record_set.class_names:
        raise ValueError(f"shots={shots} needs labelled data, but {source} has no classes")
    by_class: dict[int, list[int]] = {}
    for position, record in enumerate(record_set.records):
        if record.label >= 0:
            by_class.setdefault(record.label, []).append(position)
    short = {record_set.class_names[c]: len(p) for c, p in by_class.items() if len(p) < shots}
    if short:
        raise ValueError(f"shots={shots}: {source} has fewer records for classes {short}")
    rng = random.Random(seed)
    chosen = sorted(p for positions in by_class.values() for p in rng.sample(positions, shots))
    return RecordSet([record_set.records[p] for p in chosen], record_set.class_names, record_set.raw_class_names,
                     record_set.skipped)


# --- helpers shared by the formats ----------------------------------------------------------------
def existing_path(cfg: DataSourceConfig, want_dir: bool = False) -> Path:
    """``cfg.path`` as a Path, or ``FileNotFoundError`` naming it and the config key."""
    if not cfg.path:
        raise FileNotFoundError(f"data path is empty (config key 'path' of the {cfg.format} data source)")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data path not found: '{path}' (config key 'path' of the {cfg.format} data source)")
    if want_dir and not path.is_dir():
        raise NotADirectoryError(f"data path '{path}' must be a folder for format {cfg.format!r} (config key 'path')")
    if not want_dir and path.is_dir():
        raise IsADirectoryError(f"data path '{path}' is a folder but format {cfg.format!r} needs a file (config key 'path')")
    return path


def image_root_for(cfg: DataSourceConfig, manifest: Path) -> Path:
    """Folder relative image paths start from: ``cfg.image_root`` if set, else the manifest's folder."""
    if not cfg.image_root:
        return manifest.parent
    root = Path(cfg.image_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image_root not found: '{root}' (config key 'image_root' of the {cfg.format} data source)")
    return root


def wanted_splits(split: str) -> set[str]:
    """``"train,restval"`` -> {"train", "restval"}; empty means keep everything."""
    return {name.strip() for name in split.split(",") if name.strip()}


def lookup(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, or a dotted path into nested dicts (``captions.en``); None when absent."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def has_column(rows: list[dict[str, Any]], columns: Sequence[str], key: str) -> bool:
    return key in columns or ("." in key and any(lookup(row, key) is not None for row in rows))


def require_column(rows: list[dict[str, Any]], columns: Sequence[str], key: str, config_key: str, manifest: Path) -> None:
    if not has_column(rows, columns, key):
        raise MissingColumnError(
            f"column {key!r} (config key {config_key!r}) not found in {manifest}; columns present: {list(columns)}"
        )


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def parse_captions(value: Any, separator: str, where: str) -> list[str]:
    """A caption cell as a list of non-empty stripped strings (a string, or a list of strings)."""
    if is_missing(value):
        return []
    if isinstance(value, str):
        parts = value.split(separator) if separator else [value]
    elif isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        parts = list(value.tolist() if hasattr(value, "tolist") else value)
        if not all(isinstance(part, str) for part in parts):
            raise ValueError(f"{where}: captions must be strings, got {parts!r}")
    else:
        raise ValueError(f"{where}: caption must be a string or a list of strings, got {type(value).__name__} {value!r}")
    return [part.strip() for part in parts if part.strip()]


def raw_label(value: Any) -> str:
    """A label cell as the raw class name ("" when empty); integral floats print as integers."""
    if is_missing(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def records_from_rows(
    rows: list[dict[str, Any]],
    row_names: list[str],
    columns: Sequence[str],
    cfg: DataSourceConfig,
    manifest: Path,
    image_root: Path,
    image_key: str,
    caption_key: str | None,
    label_key: str,
) -> RecordSet:
    """Turn manifest rows into records: split filter, path join, captions, labels, skips.

    ``caption_key=None`` means every caption comes from ``cfg.templates`` (label CSVs).
    """
    require_column(rows, columns, image_key, "image_key", manifest)
    if label_key:
        require_column(rows, columns, label_key, "label_key", manifest)
    if cfg.group_key:
        require_column(rows, columns, cfg.group_key, "group_key", manifest)
    if caption_key is not None and not has_column(rows, columns, caption_key):
        if not label_key:
            raise MissingColumnError(
                f"column {caption_key!r} (config key 'caption_key') not found in {manifest}; columns present: "
                f"{list(columns)} (set label_key to build captions from class names instead)"
            )
        caption_key = None
    labels = [raw_label(lookup(row, label_key)) if label_key else "" for row in rows]
    # Classes come from every row, before the split filter, so all splits share one numbering.
    index, class_names, raw_names = build_class_index([label for label in labels if label], cfg.class_names)
    splits = wanted_splits(cfg.split)
    if splits:
        require_column(rows, columns, "split", "split", manifest)
        kept = [i for i, row in enumerate(rows) if str(lookup(row, "split")).strip() in splits]
        if rows and not kept:
            present = sorted({str(lookup(row, "split")).strip() for row in rows})
            raise ValueError(f"no rows of split {cfg.split!r} (config key 'split') in {manifest}; splits present: {present}")
        rows, row_names, labels = [rows[i] for i in kept], [row_names[i] for i in kept], [labels[i] for i in kept]
    template_captions = {raw: captions_from_templates(name, cfg.templates) for raw, name in zip(raw_names, class_names)}

    records: list[ImageTextRecord] = []
    skipped: list[tuple[str, str]] = []
    for row, name, label in zip(rows, row_names, labels):
        image = lookup(row, image_key)
        if is_missing(image) or not str(image).strip():
            skipped.append((name, f"empty image path in column {image_key!r}"))
            continue
        captions = parse_captions(lookup(row, caption_key), cfg.caption_separator, name) if caption_key else []
        if not captions and label:
            captions = list(template_captions[label])
        if not captions:
            skipped.append((name, f"no caption in column {caption_key!r} and no label"))
            continue
        image_path = os.path.join(image_root, str(image).strip())
        group = lookup(row, cfg.group_key) if cfg.group_key else None
        records.append(ImageTextRecord(image=image_path, captions=captions, label=index[label] if label else -1,
                                       group="" if is_missing(group) else str(group).strip()))
    if not records and skipped:
        first, reason = skipped[0]
        raise ValueError(f"{manifest} has no usable rows ({len(skipped)} skipped); first: {first}: {reason}")
    if not raw_names or not label_key:
        class_names, raw_names = [], []
    return RecordSet(records, class_names, raw_names, skipped)


# --- manifest formats -----------------------------------------------------------------------------
def read_csv_rows(manifest: Path) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """All cells as strings (empty cells are ""), row names ``file:line``."""
    import pandas as pd

    try:
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read CSV manifest {manifest}: {error}") from error
    frame.columns = [str(column).strip() for column in frame.columns]
    rows = frame.to_dict("records")
    return rows, [f"{manifest}:{i + 2}" for i in range(len(rows))], list(frame.columns)


@register_format("csv")
def load_csv(cfg: DataSourceConfig) -> RecordSet:
    """CSV manifest: ``image_key`` column, ``caption_key`` (split on ``caption_separator``), labels."""
    manifest = existing_path(cfg)
    rows, names, columns = read_csv_rows(manifest)
    return records_from_rows(
        rows, names, columns, cfg, manifest, image_root_for(cfg, manifest), cfg.image_key, cfg.caption_key, cfg.label_key
    )


@register_format("jsonl")
def load_jsonl(cfg: DataSourceConfig) -> RecordSet:
    """JSON-lines manifest: one object per line; captions a string or a list of strings."""
    manifest = existing_path(cfg)
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    columns: dict[str, None] = {}
    with open(manifest, encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is not part of the JSON
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{manifest}:{line_number}: not valid JSON ({error.msg})") from error
            if not isinstance(row, dict):
                raise ValueError(f"{manifest}:{line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            names.append(f"{manifest}:{line_number}")
            columns.update(dict.fromkeys(row))
    if cfg.caption_separator:
        raise ValueError("caption_separator applies to CSV cells only; JSONL captions are already lists")
    return records_from_rows(
        rows, names, list(columns), cfg, manifest, image_root_for(cfg, manifest), cfg.image_key, cfg.caption_key, cfg.label_key
    )


@register_format("parquet")
def load_parquet(cfg: DataSourceConfig) -> RecordSet:
    """Parquet manifest: same columns as CSV; a caption cell may be a list of strings."""
    import pandas as pd

    manifest = existing_path(cfg)
    try:
        frame = pd.read_parquet(manifest)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read Parquet manifest {manifest}: {error}") from error
    rows = frame.to_dict("records")
    names = [f"{manifest} row {i}" for i in range(len(rows))]
    return records_from_rows(
        rows, names, [str(c) for c in frame.columns], cfg, manifest, image_root_for(cfg, manifest),
        cfg.image_key, cfg.caption_key, cfg.label_key,
    )


@register_format("label_csv")
def load_label_csv(cfg: DataSourceConfig) -> RecordSet:
    """``path,label`` CSV (PlantVillage layout); captions are the templates on the class name."""
    manifest = existing_path(cfg)
    rows, names, columns = read_csv_rows(manifest)
    image_key = cfg.image_key if cfg.image_key in columns else "path"
    label_key = cfg.label_key or "label"
    return records_from_rows(rows, names, columns, cfg, manifest, image_root_for(cfg, manifest), image_key, None, label_key)


# --- Karpathy JSON ---------------------------------------------------------------------------------
def karpathy_image_root(cfg: DataSourceConfig, manifest: Path, first_image: str | None) -> Path:
    """Where a Karpathy JSON's images are (see the module docstring for the search order)."""
    if cfg.image_root:
        return image_root_for(cfg, manifest)
    base = manifest.parent
    candidates = [base / "images", *sorted(p for p in base.glob("*_images") if p.is_dir()), base]
    if first_image:
        for candidate in candidates:
            if (candidate / first_image).exists():
                return candidate
    return base / "images" if (base / "images").is_dir() else base


FILENAME_PREFIX = "@filename_prefix"


def filename_prefix(filename: str) -> str | None:
    """Scene class from a file name such as ``airport_348.jpg`` -> ``airport``; None if numeric only.

    Use ``label_key: "@filename_prefix"`` (Karpathy JSON): RSICD's scene classes live in its file
    names, and images with purely numeric names have no class (unlabelled, never mislabelled).
    """
    stem = Path(filename).stem
    match = re.match(r"^(.*?)[_\-]?\d+$", stem)
    prefix = match.group(1) if match else stem
    return prefix or None


@register_format("karpathy")
def load_karpathy(cfg: DataSourceConfig) -> RecordSet:
    """Karpathy caption JSON: ``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}``."""
    manifest = existing_path(cfg)
    try:
        with open(manifest, encoding="utf-8-sig") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{manifest}: not valid JSON ({error})") from error
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{manifest}: expected a Karpathy JSON object with an 'images' list")

    rows: list[dict[str, Any]] = []
    names: list[str] = []
    for position, entry in enumerate(entries):
        where = f"{manifest} images[{position}]"
        if not isinstance(entry, dict) or "filename" not in entry:
            raise MissingColumnError(f"{where}: every entry needs a 'filename'; got {entry!r:.200}")
        relative = os.path.join(entry.get("filepath") or "", entry["filename"])
        sentences = entry.get("sentences") or []
        if not isinstance(sentences, list) or not all(isinstance(s, dict) for s in sentences):
            raise ValueError(f"{where}: 'sentences' must be a list of objects with 'raw'")
        row = {"image": relative, "split": entry.get("split", ""), "captions": [s.get("raw") or "" for s in sentences]}
        if cfg.label_key == FILENAME_PREFIX:
            row[cfg.label_key] = filename_prefix(entry["filename"])
        elif cfg.label_key:
            row[cfg.label_key] = entry.get(cfg.label_key)
        rows.append(row)
        names.append(f"{where} ({relative})")
    columns = ["image", "split", "captions", *([cfg.label_key] if cfg.label_key else [])]
    image_root = karpathy_image_root(cfg, manifest, rows[0]["image"] if rows else None)
    return records_from_rows(rows, names, columns, cfg, manifest, image_root, "image", "captions", cfg.label_key)


# --- class folders ---------------------------------------------------------------------------------
@register_format("folders")
def load_folders(cfg: DataSourceConfig) -> RecordSet:
    """``root/<class>/*.{jpg,...}``; every template on the class's natural name is a caption."""
    root = existing_path(cfg, want_dir=True)
    if cfg.split:
        if not (root / cfg.split).is_dir():
            folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise ValueError(f"split {cfg.split!r} (config key 'split'): {root / cfg.split} is not a folder; a "
                             f"folders source with a split reads <path>/<split>/<class>/ (folders in {root}: "
                             f"{folders}); leave split empty to read {root} itself as the class folders")
        root = root / cfg.split
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"data path '{root}' has no class folders (expected <root>/<class>/<image files>)")
    skipped = [(str(p), "file outside a class folder") for p in sorted(root.iterdir()) if p.is_file()]
    index, class_names, raw_names = build_class_index([p.name for p in class_dirs], cfg.class_names)
    records: list[ImageTextRecord] = []
    for class_dir in class_dirs:
        captions = captions_from_templates(class_names[index[class_dir.name]], cfg.templates)
        for item in sorted(class_dir.iterdir()):
            if item.is_dir():
                skipped.append((str(item), "sub-folder inside a class folder is not read"))
            elif item.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append((str(item), f"not an image extension ({', '.join(IMAGE_EXTENSIONS)})"))
            else:
                records.append(ImageTextRecord(str(item), list(captions), index[class_dir.name]))
    return RecordSet(records, class_names, raw_names, skipped)

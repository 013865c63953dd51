"""Model cards generated from a run folder, never hand-filled.

``write_run_card(run_dir)`` writes ``README.md`` (Hugging Face card metadata: license,
base_model, datasets, tags, pipeline_tag and a ``model-index`` holding the metrics of the run's
``metrics.json`` exactly as measured) and ``metadata.json`` (machine-readable: input modality,
channels/bands, value range, preprocessing, classes and templates, training-data provenance,
retention, package versions, config hash) into ``RUN/model`` or any other folder.

What the run cannot know (data provenance, the training population of a medical model, licence,
intended use) comes from a *card config* (:class:`CardConfig`, YAML; ``RUN/card.yaml`` is read
when present). The prose comes from the card domain's template: ``model_cards/templates/generic.md``,
or the one a domain package registers with :func:`register_card_domain` (each ships
``card_template.md`` in its own package); the card's domain is ``--domain`` or the recipe's
(:func:`recipe_domain`). The medical one says the model is not for
clinical use and describes the training population, with ``not stated`` for unknown fields.

Privacy: every string that reaches a card or ``metadata.json`` passes :func:`scrub`, which
replaces paths, file names, DICOM-style UIDs, long digit runs, dates, e-mail addresses and
``patient123``-like tokens with ``[redacted]``. The resolved recipe (which holds data paths) is
never copied into a card, only its hash.
"""
from __future__ import annotations

import hashlib
import json
import platform
import re
import string
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

import domainclip.model_cards as bundled_cards

from . import config as config_lib
from .checkpoint import atomic_write_text
from .backbones.factory import INPUT_ADAPTERS
from .data.sources import FORMAT_LOADERS
from .data.transforms import IMAGE_READERS, TRAIN_TRANSFORMS
from .eval.headline import numeric_metrics
from .plugins import load_domain_plugins, require_registered
from .run_config import RunConfig

PACKAGES = ("domainclip", "torch", "open_clip_torch", "transformers", "peft", "accelerate", "timm",
            "safetensors", "huggingface_hub")
NOT_STATED = "not stated"
REDACTED = "[redacted]"
CARD_FILE = "card.yaml"
GENERIC = "generic"


# --- card domains: each domain package registers its own template -----------------------------

@dataclass(frozen=True)
class CardDomain:
    """A card template and what the card says about a domain, registered by the domain's package.

    Attributes:
        name: the domain's name (``CardConfig.domain``, ``--domain``, a card tag).
        template: Markdown file with ``${slot}`` placeholders (see :data:`SLOT_NAMES`).
        package: module prefix of the package whose data formats, augmentations and image readers
            make a recipe belong to this domain (e.g. ``domainclip.domains.medical``); empty: never
            chosen from a recipe, only by name.
        required_slots: slots the template must have beyond :data:`REQUIRED_SLOTS` (medical:
            ``population``).
        tags: card tags added for this domain.
        metadata: facts written under ``domain_metadata`` in ``metadata.json`` (e.g.
            ``{"clinical_use": False}``).
    """

    name: str
    template: Path
    package: str = ""
    required_slots: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


CARD_DOMAINS: dict[str, CardDomain] = {}


def register_card_domain(domain: CardDomain) -> CardDomain:
    """Make ``domain`` a card domain (one line in the domain package's ``__init__``)."""
    CARD_DOMAINS[domain.name] = domain
    return domain


def card_domain(name: str) -> CardDomain:
    """The registered card domain ``name`` (the domain packages are imported when needed)."""
    require_registered(name, CARD_DOMAINS, f"card domain {name!r} has no template")
    return CARD_DOMAINS[name]


def _generic_template() -> Path:
    return Path(next(iter(bundled_cards.__path__))) / "templates" / f"{GENERIC}.md"


register_card_domain(CardDomain(GENERIC, _generic_template()))


def _owner(obj: Any) -> str:
    """The card domain whose package defined ``obj`` (a format loader, transform, reader), or ``""``."""
    module = getattr(obj, "__module__", "") or ""
    for domain in CARD_DOMAINS.values():
        if domain.package and (module == domain.package or module.startswith(domain.package + ".")):
            return domain.name
    return ""


def recipe_domain(cfg: RunConfig) -> str:
    """The card domain a recipe belongs to: the domain whose package registered one of its data
    formats, its augmentation or its image reader (the first found, in that order); else generic."""
    load_domain_plugins()
    owners = [FORMAT_LOADERS.get(s.format) for s in (cfg.data.train, *cfg.data.train_extra, *(t.data for t in cfg.eval))]
    owners.append(TRAIN_TRANSFORMS.get(str((cfg.data.augment or {}).get("name", ""))))
    owners.append(INPUT_ADAPTERS.get(str((cfg.model.input or {}).get("name", ""))))
    reader = (cfg.model.preprocess or {}).get("reader") or {}
    owners.append(IMAGE_READERS.get(str(reader.get("name", "")) if isinstance(reader, dict) else ""))
    for owner in owners:
        name = _owner(owner) if owner is not None else ""
        if name:
            return name
    return GENERIC


# --- card config: what the user states about the data and the model --------------------------

@dataclass
class DataProvenance:
    """One training data set as the card names it.

    Attributes:
        name: data set name shown on the card (e.g. ``MIMIC-CXR``).
        hub_id: Hugging Face dataset id, listed under ``datasets:`` in the card metadata.
        licence: the data set's licence or terms of use.
        source: citation or URL.
        description: how the data was collected, selected and labelled.
    """

    name: str = ""
    hub_id: str = ""
    licence: str = ""
    source: str = ""
    description: str = ""


@dataclass
class PopulationConfig:
    """Who the training images come from (medical cards); empty fields print ``not stated``.

    Attributes:
        patients: number of patients.
        studies: number of studies / examinations.
        images: number of images.
        age_range: e.g. ``18-90 years`` or ``median 61 (IQR 48-72)``.
        sex: e.g. ``54 % female``.
        sites: hospitals or sites the data comes from.
        countries: countries of the sites.
        devices: scanners / acquisition devices and protocols.
        period: collection period (years only, e.g. ``2011-2016``).
        selection: inclusion and exclusion criteria.
        labels: how labels were obtained (report mining, expert reading, ...).
        notes: anything else about the population.
    """

    patients: int | None = None
    studies: int | None = None
    images: int | None = None
    age_range: str = ""
    sex: str = ""
    sites: list[str] = field(default_factory=list)
    countries: list[str] = field(default_factory=list)
    devices: str = ""
    period: str = ""
    selection: str = ""
    labels: str = ""
    notes: str = ""


@dataclass
class InputDescription:
    """What the model expects as input, beyond the preprocessing that travels with the weights.

    Attributes:
        modality: e.g. ``chest X-ray (PA/AP)``, ``Sentinel-2 RGB composite``, ``leaf photograph``.
        bands: names of the input channels in order (default ``red, green, blue`` or ``grey``).
        value_range: range of the decoded pixel values (default ``[0, 255]``: 8-bit images).
        notes: windowing, band scaling or other conversions done before the kit sees the image.
    """

    modality: str = ""
    bands: list[str] = field(default_factory=list)
    value_range: list[float] = field(default_factory=list)
    notes: str = ""


@dataclass
class CardConfig:
    """Everything a card states that the run folder cannot know.

    Attributes:
        domain: card domain (template): generic, or one a domain package registers (medical,
            remote_sensing, agriculture, multilingual); empty: the recipe's domain
            (:func:`recipe_domain`).
        name: model name in the card (default: the run folder's or the repo's name).
        license: licence id of the weights for the card metadata (``other`` when unknown).
        base_model: Hugging Face id of the base model (default: derived from the recipe).
        tags: extra card tags.
        language: languages of the text side (ISO codes), for multilingual models.
        intended_use: what the model is meant for, added to the template's text.
        limitations: extra known limitations, added to those the card derives from the run.
        training_data: provenance of the training data sets, in the recipe's source order.
        population: training population (medical).
        input: input description.
        template: path of a custom template instead of the domain's registered one.
    """

    domain: str = ""
    name: str = ""
    license: str = "other"
    base_model: str = ""
    tags: list[str] = field(default_factory=list)
    language: list[str] = field(default_factory=list)
    intended_use: str = ""
    limitations: list[str] = field(default_factory=list)
    training_data: list[DataProvenance] = field(default_factory=list)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    input: InputDescription = field(default_factory=InputDescription)
    template: str = ""

    def __post_init__(self) -> None:
        if self.domain:
            card_domain(self.domain)


def load_card_config(run_dir: str | Path, card: CardConfig | str | Path | None = None) -> CardConfig:
    """``card`` itself, the YAML file it names, ``RUN/card.yaml`` when present, or the defaults."""
    if isinstance(card, CardConfig):
        return card
    if card:
        return config_lib.load(CardConfig, card)
    default = Path(run_dir) / CARD_FILE
    return config_lib.load(CardConfig, default) if default.is_file() else CardConfig()


# the command-line options that override card-config fields (``publish``), named in errors
OVERRIDE_OPTIONS = {"domain": "--domain", "license": "--license", "name": "name (the repo name)"}


def card_config(run_dir: str | Path, card: CardConfig | str | Path | None = None, **overrides: Any) -> CardConfig:
    """The card config a card is written from: :func:`load_card_config` with the non-empty
    ``overrides`` (``name``, ``domain``, ``license``) replacing its fields. An unknown override
    domain is a ``ValueError`` naming ``--domain``, the closest and the valid card domains."""
    cfg = load_card_config(run_dir, card)
    given = {k: v for k, v in overrides.items() if v}
    unknown = sorted(set(given) - set(OVERRIDE_OPTIONS))
    if unknown:
        raise ValueError(f"card overrides {unknown} are not card-config fields that can be overridden "
                         f"(valid: {', '.join(OVERRIDE_OPTIONS)})")
    if "domain" in given:
        require_registered(given["domain"], CARD_DOMAINS, f"--domain {given['domain']!r} has no card template",
                           valid="valid card domains")
    if given:
        options = ", ".join(OVERRIDE_OPTIONS[k] for k in given)
        cfg = config_lib.from_dict(CardConfig, {**config_lib.to_dict(cfg), **given}, source=f"card options {options}")
    return cfg


# --- scrubber: nothing that looks like a path or an identifier reaches a card ----------------

FILE_EXTENSIONS = ("png", "jpg", "jpeg", "dcm", "dicom", "ima", "nii", "nii.gz", "nrrd", "mha", "mhd", "tif",
                   "tiff", "bmp", "webp", "gif", "npy", "npz", "h5", "hdf5", "csv", "tsv", "json", "jsonl",
                   "parquet", "tar", "zip", "gz", "pt", "pth", "bin", "ckpt", "safetensors", "svs", "jp2")
IDENTIFIER_PATTERNS = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"\.(%s)$" % "|".join(re.escape(e) for e in FILE_EXTENSIONS),  # a file name
    r"\d+(\.\d+){3,}",  # DICOM UID (1.2.840.113619....) and other dotted ids
    r"\d{5,}",  # MRN, accession number, DICOM date (20190304)
    r"(?<![a-z])(patient|pat|subject|subj|sub|study|series|mrn|accession|case|pid|exam|scan|record|id|nhs|ssn|dob)"
    r"[-_#:]?\d+",  # patient12345, sub-01, study6, MRN:123
    r"\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[/.]\d{1,2}[/.]\d{2,4}",  # full dates
    r"[^@\s]+@[^@\s]+\.[a-z]{2,}",  # e-mail addresses
    r"[a-z]{2,}\^",  # a DICOM person name: Doe^John, DOE^JOHN^^^
))
PUNCTUATION = "()[]{}<>,;:\"'`"
MONTH = (r"(?:january|february|march|april|may|june|july|august|september|october|november|december"
         r"|jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec)\b\.?")
# identifiers that span words, redacted in the running text before it is split into words (the
# group ``keep``, where there is one, stays)
PHRASE_PATTERNS = tuple(re.compile(p, re.IGNORECASE) for p in (
    # the number after an identifying noun: "patient 1234", "MRN: 0012", "subject no. 7", "accession # 88"
    r"(?P<keep>\b(?:patient|subject|mrn|accession|pid|nhs|ssn|dob)(?:\s+(?:no\.?|number|id))?\s*[:#-]?\s+)\d+",
    r"\b\d{1,2}(?:st|nd|rd|th)?[-\s./]*%s[-\s./,]*\d{2,4}\b" % MONTH,  # 04-Mar-2019, 4 March 2019
    r"\b%s\s*\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}\b" % MONTH,  # March 4, 2019
))


def looks_like_path(token: str) -> bool:
    """A filesystem path (absolute, relative with ``./``, Windows, or two or more ``/``); URLs are not."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", token, re.IGNORECASE):
        return False
    if not re.search(r"[a-z0-9]", token, re.IGNORECASE):
        return False  # "/", "->", "1/2" are not paths
    return (token.startswith(("/", "~", "./", "../")) or "\\" in token or token.count("/") >= 2
            or bool(re.match(r"^[a-z]:[\\/]", token, re.IGNORECASE)))


def is_identifier(token: str) -> bool:
    """True when ``token`` (one whitespace-free word) is a path, a file name or looks like an id."""
    token = token.strip(PUNCTUATION)
    return bool(token) and (looks_like_path(token) or any(p.search(token) for p in IDENTIFIER_PATTERNS))


def scrub_text(text: str) -> tuple[str, int]:
    """``text`` with every identifier-like word or phrase replaced by ``[redacted]``, and how many were."""
    phrase_hits = 0
    for pattern in PHRASE_PATTERNS:
        text, found = pattern.subn(lambda match: (match.groupdict().get("keep") or "") + REDACTED, text)
        phrase_hits += found
    words = re.split(r"(\s+)", text)
    hits = sum(1 for w in words if is_identifier(w))
    return "".join(REDACTED if is_identifier(w) else w for w in words), hits + phrase_hits


def scrub(value: Any, keep: tuple[str, ...] = ()) -> tuple[Any, int]:
    """Scrub every string value in nested dicts and lists (not dict keys: those are the schema).

    Values under keys in ``keep`` (a hash, package versions) are trusted and left alone.
    """
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        out, total = {}, 0
        for key, item in value.items():
            out[key], hits = (item, 0) if key in keep else scrub(item, keep)
            total += hits
        return out, total
    if isinstance(value, (list, tuple)):
        pairs = [scrub(item, keep) for item in value]
        return [p[0] for p in pairs], sum(p[1] for p in pairs)
    return value, 0


# --- metadata: everything the card says, as data ----------------------------------------------

def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def config_hash(cfg: RunConfig) -> str:
    """First 16 hex digits of the SHA-256 of the resolved recipe (sorted JSON)."""
    text = json.dumps(config_lib.to_dict(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_model_id(cfg: RunConfig) -> str:
    """A readable id of the base weights (scrubbed later: a local weights path is withheld)."""
    model = cfg.model
    if model.kind == "compact_base":
        return "domainclip/compact-base"
    if model.kind == "dual_encoder":
        return f"{model.vision}+{model.text}"
    return f"{model.name}{':' + model.pretrained if model.pretrained else ''}"


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def base_hub_id(cfg: RunConfig) -> str:
    """The base model's Hugging Face Hub id when the recipe names one, else ``""``.

    ``hf`` backbones named ``ORG/NAME`` that is not a local folder, and open_clip ``hf-hub:ORG/NAME``;
    an open_clip pretrained tag (``laion2b_s34b_b79k``), a local file or folder, the bundled
    compact base and a dual encoder (two models) are not one Hub id.
    """
    model = cfg.model
    candidates = {"hf": model.name, "open_clip": model.name[len("hf-hub:"):] if model.name.startswith("hf-hub:")
                  else (model.pretrained[len("hf-hub:"):] if model.pretrained.startswith("hf-hub:") else "")}
    name = candidates.get(model.kind, "")
    if not name or not HUB_ID.match(name) or ".." in name or Path(name).expanduser().exists():
        return ""
    return name


GENERIC_LAYOUTS = ("csv", "jsonl", "parquet", "karpathy", "folders", "label_csv", "webdataset")
# data formats that are layouts of the user's own files, not named data sets: core's, plus those a
# domain package declares with :func:`register_data_layout` (e.g. a class-folder reader with the
# domain's prompts); a card lists none of them under ``datasets:``
DATA_LAYOUTS: set[str] = set(GENERIC_LAYOUTS)


def register_data_layout(*formats: str) -> None:
    """Declare data ``formats`` (registered with ``core.data.sources.register_format``) to be
    layouts of the user's own files rather than named data sets: a card never lists them under
    ``datasets:`` (one line beside the domain's ``@register_format``)."""
    DATA_LAYOUTS.update(formats)


def is_data_layout(fmt: str) -> bool:
    """True when format ``fmt`` is a layout (core's or a domain's), not a named data set."""
    if fmt not in DATA_LAYOUTS:
        load_domain_plugins()  # a domain's layouts are declared when its package is imported
    return fmt in DATA_LAYOUTS


def _dataset_ids(cfg: RunConfig, card: CardConfig) -> list[str]:
    """What the card's ``datasets:`` lists: the stated hub id or name of each training source, else
    the named data set the recipe's format stands for (``rsicd``, ``plantvillage``); a layout of the
    user's own files (core's csv, folders..., or a domain's :func:`register_data_layout`) names no
    data set, and a folder name is never used."""
    out = []
    for i, source in enumerate([cfg.data.train, *cfg.data.train_extra]):
        stated = card.training_data[i] if i < len(card.training_data) else DataProvenance()
        name = stated.hub_id or stated.name or ("" if is_data_layout(source.format) else source.format)
        if name and not is_identifier(name):
            out.append(name)
    return list(dict.fromkeys(out))


def _data_name(source: Any) -> str:
    if not source.path:
        return source.format
    path = Path(source.path)
    return path.name if source.format == "folders" else path.parent.name


def _training_data(cfg: RunConfig, card: CardConfig) -> list[dict[str, Any]]:
    sources = [cfg.data.train, *cfg.data.train_extra]
    if len(card.training_data) > len(sources):
        raise ValueError(f"card training_data lists {len(card.training_data)} data sets but the run trained on "
                         f"{len(sources)} source(s) (data.train plus data.train_extra)")
    rows = []
    for i, source in enumerate(sources):
        stated = config_lib.to_dict(card.training_data[i]) if i < len(card.training_data) else {}
        rows.append({"name": stated.get("name") or _data_name(source), "format": source.format,
                     "split": source.split, "shots": source.shots, "class_subset": source.class_subset,
                     "hub_id": stated.get("hub_id", ""), "licence": stated.get("licence") or NOT_STATED,
                     "source": stated.get("source") or NOT_STATED,
                     "description": stated.get("description") or NOT_STATED})
    return rows


def _input(preprocess: dict[str, Any], card: CardConfig) -> dict[str, Any]:
    channels = len(preprocess["mean"])
    reader = preprocess.get("reader") or {}
    if reader:  # e.g. multispectral GeoTIFFs: values in the data's own units, no / 255
        default_bands, value_range = list(reader.get("bands", [])), NOT_STATED
        decoding = (f"files read by the {reader.get('name')!r} reader as (bands, H, W) floats in the data's own "
                    f"units (no scaling to 0..1); then (x - mean) / std per band")
    else:
        default_bands = ["red", "green", "blue"] if channels == 3 else ["grey"] if channels == 1 else []
        value_range = [0, 255]
        decoding = ("8-bit RGB after decoding; 16-bit and float grey images are scaled by their own "
                    "minimum..maximum to 0..255; pixels / 255, then (x - mean) / std per channel")
    return {"modality": card.input.modality or "image", "channels": channels,
            "bands": card.input.bands or default_bands, "value_range": card.input.value_range or value_range,
            "decoding": decoding, "notes": card.input.notes, "preprocess": preprocess}


def _evaluation(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for m in metrics:
        rows.append({"dataset": m["dataset"], "task": m["task"], "language": m.get("language", ""),
                     "metrics": numeric_metrics(m["metrics"]),
                     **({"retention": {k: v for k, v in m["retention"].items() if k != "before_metrics"}}
                        if "retention" in m else {})})
    return rows


def run_metadata(run_dir: str | Path, card: CardConfig | None = None) -> dict[str, Any]:
    """Everything the card says, as scrubbed data (also written as ``metadata.json``)."""
    run_dir = Path(run_dir)
    card = card or CardConfig()
    cfg = config_lib.load(RunConfig, run_dir / "config.yaml")
    model_info = json.loads((run_dir / "model" / "model.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else []
    summary = json.loads((run_dir / "train_summary.json").read_text())
    evaluation = _evaluation(metrics)
    guard_file = run_dir / "precision_guard.json"
    guard = _precision_guard(json.loads(guard_file.read_text())) if guard_file.is_file() else {}
    population = config_lib.to_dict(card.population)
    domain = card_domain(card.domain or recipe_domain(cfg))
    meta = {
        "name": card.name or run_dir.name,
        "domain": domain.name,
        "domain_metadata": dict(domain.metadata),
        "license": card.license,
        "base_model": card.base_model or base_model_id(cfg),
        "base_model_hub_id": card.base_model or base_hub_id(cfg),
        "datasets": _dataset_ids(cfg, card),
        "pipeline_tag": "",
        "base": {"kind": cfg.model.kind, "revision": cfg.model.revision or NOT_STATED},
        "method": config_lib.to_dict(cfg.method),
        "input": _input(model_info["backbone"]["preprocess"], card),
        "classes": model_info.get("task", {}).get("class_names", []),
        "templates": model_info.get("task", {}).get("templates", []),
        "language": card.language,
        "training_data": _training_data(cfg, card),
        "population": {k: (v if v not in (None, "", []) else NOT_STATED) for k, v in population.items()},
        "training": {k: summary.get(k) for k in ("global_step", "train_seconds", "trainable_parameters")},
        "evaluation": evaluation,
        "retention": [{"dataset": e["dataset"], **e["retention"]} for e in evaluation if "retention" in e],
        "precision_guard": guard,
        "intended_use": card.intended_use,
        "limitations": card.limitations,
        "tags": [*domain.tags, *card.tags],
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "config_hash": config_hash(cfg),
    }
    meta, hits = scrub(meta, keep=("config_hash", "versions", "preprocess"))
    meta["redacted_values"] = hits
    return meta


def _precision_guard(report: dict[str, Any]) -> dict[str, Any]:
    """Per precision: passed, each task's top-1 agreement with fp32 (a list of ``{"dataset",
    "top1_agreement"}``: task names and data paths are values, so the scrubber sees them), and
    whether zero-shot near ties were refined in fp32 (``domainclip precision-guard [--refine-ties]``)."""
    return {precision: {"passed": all(entry[precision]["passed"] for entry in report["results"].values()),
                        "top1_agreement": [{"dataset": name, "top1_agreement": entry[precision]["top1_agreement"]}
                                           for name, entry in report["results"].items()],
                        "refine_ties": bool(report.get("refine_ties", False))}
            for precision in report["precisions"]}


# --- rendering ------------------------------------------------------------------------------

TASK_TYPES = {"zeroshot_classification": "zero-shot-image-classification",
              "zeroshot_retrieval": "image-text-retrieval", "zeroshot_multilabel": "multi-label-image-classification"}
TABLE_METRICS = ("acc1", "acc5", "mean_per_class_recall", "mean_recall", "image_retrieval_recall@1",
                 "text_retrieval_recall@1", "mean_auroc", "macro_auroc")
REQUIRED_SLOTS = ("title", "summary", "evaluation", "training_data", "input", "limitations", "reproducibility")


def _reported(values: dict[str, Any]) -> dict[str, float]:
    """Measured metrics, counts (``n_images``...) left out."""
    return {k: v for k, v in values.items() if not k.startswith("n_")}


def _model_index(name: str, meta: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for entry in meta["evaluation"]:
        values = _reported(entry["metrics"])
        if not values:
            continue
        results.append({
            "task": {"type": TASK_TYPES.get(entry["task"], entry["task"]), "name": entry["task"]},
            "dataset": {"name": entry["dataset"], "type": entry["dataset"]},
            "metrics": [{"type": k, "name": k, "value": v} for k, v in values.items()],
        })
    return [{"name": name, "results": results}] if results else []


def front_matter(meta: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML header (Hugging Face model card metadata)."""
    header: dict[str, Any] = {
        "license": meta["license"],
        "library_name": "domainclip",
        "tags": list(dict.fromkeys(["clip", "domainclip", meta["domain"].replace("_", "-"),
                                    meta["method"]["name"], *meta["tags"]])),
    }
    if meta["base_model_hub_id"] and REDACTED not in meta["base_model_hub_id"]:
        header["base_model"] = meta["base_model_hub_id"]
    if meta["datasets"]:
        header["datasets"] = meta["datasets"]
    if meta["pipeline_tag"]:  # only set for a folder that transformers' pipeline loads (see publish)
        header["pipeline_tag"] = meta["pipeline_tag"]
    if meta["language"]:
        header["language"] = meta["language"]
    index = _model_index(meta["name"], meta)
    if index:
        header["model-index"] = index
    return header


def _summary(meta: dict[str, Any]) -> str:
    method = meta["method"]
    settings = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name")
    train = meta["training"]
    steps = f"{train['global_step']} steps" if train.get("global_step") is not None else "an unstated number of steps"
    params = f"{train['trainable_parameters']:,} trained parameters" if train.get("trainable_parameters") else ""
    seconds = f"{train['train_seconds']:.0f} s of training" if train.get("train_seconds") is not None else ""
    details = ", ".join(x for x in (steps, params, seconds) if x)
    return (f"Adapted from the base model `{meta['base_model']}` ({meta['base']['kind']}, revision "
            f"{meta['base']['revision']}) with domainclip's `{method['name']}` method ({details}).\n\n"
            f"Method settings: {settings or 'defaults'}.")


def _evaluation_text(meta: dict[str, Any]) -> str:
    if not meta["evaluation"]:
        return "This run was not evaluated: the card reports no metrics."
    lines = ["Numbers are copied from the run's `metrics.json` as measured (nothing re-run, rounded, or "
             "hand-edited in the card metadata; the table shows 3 decimals).", "",
             "| data set | task | images | metrics | change from base |", "|---|---|---|---|---|"]
    for entry in meta["evaluation"]:
        values = entry["metrics"]
        shown = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if k in TABLE_METRICS) or \
            ", ".join(f"{k} {v:.3f}" for k, v in _reported(values).items())
        change = entry.get("retention")
        delta = f"{change['metric']} {change['before']:.3f} → {change['after']:.3f}" if change else ""
        lines.append(f"| {entry['dataset']} | {entry['task']} | {values.get('n_images', values.get('n_samples', ''))} | {shown} | {delta} |")
    for precision, guard in meta.get("precision_guard", {}).items():
        agreements = ", ".join(f"{row['dataset']} {100 * row['top1_agreement']:.2f} %" for row in guard["top1_agreement"])
        refined = (", zero-shot near ties re-decided in fp32, `domainclip precision-guard --refine-ties`"
                   if guard.get("refine_ties") else ", `domainclip precision-guard`")
        lines += ["", f"Precision guard ({precision} weights against fp32{refined}): "
                      f"{'passed' if guard['passed'] else 'failed'}; top-1 agreement {agreements}."]
    return "\n".join(lines)


def _training_data_text(meta: dict[str, Any]) -> str:
    lines = []
    for d in meta["training_data"]:
        how = ", ".join(x for x in (d["format"], f"split {d['split']}" if d["split"] else "",
                                    f"{d['shots']} shots per class" if d["shots"] else "",
                                    f"{d['class_subset']} classes" if d["class_subset"] else "") if x)
        lines.append(f"- **{d['name']}** ({how}). Licence: {d['licence']}. Source: {d['source']}. "
                     f"Collection and labelling: {d['description']}.")
    return "\n".join(lines)


def _classes_text(meta: dict[str, Any]) -> str:
    if not meta["classes"]:
        return "The run trained on captions without a fixed class list."
    return ("Classes, in label order: " + ", ".join(meta["classes"]) + ".\n\nPrompt templates of the training data: " +
            "; ".join(f"`{t}`" for t in meta["templates"]))


def _input_text(meta: dict[str, Any]) -> str:
    info = meta["input"]
    pre = info["preprocess"]
    span = info["value_range"]
    span = f"{span[0]}–{span[-1]}" if isinstance(span, list) and span else NOT_STATED
    lines = [f"- Modality: {info['modality']}", f"- Channels: {info['channels']} ({', '.join(info['bands'])})",
             f"- Value range after decoding: {span}",
             f"- Preprocessing: resize ({pre.get('resize_mode')}, {pre.get('interpolation')}) to "
             f"{pre.get('image_size')} px, mean {pre.get('mean')}, std {pre.get('std')}; {info['decoding']}."]
    if info["notes"]:
        lines.append(f"- Notes: {info['notes']}")
    return "\n".join(lines)


def _population_text(meta: dict[str, Any]) -> str:
    labels = {"patients": "Patients", "studies": "Studies", "images": "Images", "age_range": "Age range",
              "sex": "Sex", "sites": "Sites", "countries": "Countries", "devices": "Devices and protocols",
              "period": "Collection period", "selection": "Selection criteria", "labels": "Labels",
              "notes": "Notes"}
    rows = []
    for key, label in labels.items():
        value = meta["population"].get(key, NOT_STATED)
        value = ", ".join(value) if isinstance(value, list) else f"{value:,}" if isinstance(value, int) else value
        rows.append(f"| {label} | {value} |")
    return "\n".join(["| | |", "|---|---|", *rows])


def derived_limitations(meta: dict[str, Any]) -> list[str]:
    """Limitations the run itself shows (no evaluation, few shots, forgetting), plus the user's."""
    out = []
    if not meta["evaluation"]:
        out.append("The run was not evaluated; its accuracy is unknown.")
    else:
        names = ", ".join(e["dataset"] for e in meta["evaluation"])
        out.append(f"Measured only on {names}; performance on other data, sites or populations is unknown.")
    for d in meta["training_data"]:
        if d["shots"]:
            out.append(f"Trained on {d['shots']} examples per class of {d['name']} (few-shot): expect high variance.")
    for precision, guard in meta.get("precision_guard", {}).items():
        if not guard["passed"]:
            worst = min(guard["top1_agreement"], key=lambda row: row["top1_agreement"])
            out.append(f"With the weights held in {precision}, {100 * (1 - worst['top1_agreement']):.1f} % of the "
                       f"top-1 decisions on {worst['dataset']} differ from fp32 (`domainclip precision-guard`); where decisions must match "
                       f"fp32, refine near ties in fp32 (`refine_ties`, zero-shot classification) or encode "
                       f"with precision fp32.")
    for r in meta["retention"]:
        if r.get("change") is not None and r["change"] < 0:
            out.append(f"On {r['dataset']} the {r['metric']} fell from {r['before']:.3f} (base model) to "
                       f"{r['after']:.3f}: the adaptation traded general ability for the domain.")
    return out + list(meta["limitations"])


def template_path(domain: str, template: str = "") -> Path:
    """``template`` when given, else the template the domain registered (:class:`CardDomain`)."""
    path = Path(template) if template else card_domain(domain).template
    if not path.is_file():
        raise FileNotFoundError(f"card template {path} does not exist (domain {domain!r})")
    return path


def load_template(domain: str, template: str = "") -> string.Template:
    """A domain template, checked for the slots every card needs and those its domain requires."""
    path = template_path(domain, template)
    text = string.Template(path.read_text())
    slots = set(text.get_identifiers())
    needed = set(REQUIRED_SLOTS) | set(card_domain(domain).required_slots)
    missing = sorted(needed - slots)
    unknown = sorted(slots - set(SLOT_NAMES))
    if missing or unknown or not text.is_valid():
        raise ValueError(f"card template {path}: missing slots {missing}, unknown slots {unknown} "
                         f"(valid: {', '.join(SLOT_NAMES)}; write $$ for a literal dollar)")
    return text


SLOT_NAMES = (*REQUIRED_SLOTS, "classes", "population", "intended_use", "usage", "extra")


def render_card(meta: dict[str, Any], domain_text: str = "", usage: str = "", template: str = "") -> str:
    """The card: YAML front matter plus the domain template filled from ``meta``."""
    header = yaml.safe_dump(front_matter(meta), sort_keys=False, allow_unicode=True).rstrip()
    slots = {
        "title": meta["name"], "summary": _summary(meta), "evaluation": _evaluation_text(meta),
        "training_data": _training_data_text(meta), "classes": _classes_text(meta), "input": _input_text(meta),
        "population": _population_text(meta), "intended_use": meta["intended_use"],
        "usage": usage or "Load the run folder with `domainclip.core.train.load_trained(RUN)`, or export it "
                          "with `domainclip publish RUN --repo-id ORG/NAME --dry-run DIR`.",
        "limitations": "\n".join(f"- {x}" for x in derived_limitations(meta)),
        "reproducibility": f"Resolved-recipe hash `{meta['config_hash']}`. Packages: " +
                           ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + ".",
        "extra": domain_text.strip(),
    }
    body = load_template(meta["domain"], template).substitute(slots)
    body = re.sub(r"\n{3,}", "\n\n", body).strip()
    return f"---\n{header}\n---\n{body}\n"


def card_text(run_dir: str | Path, card: CardConfig | str | Path | None = None, domain_text: str = "",
              usage: str = "", pipeline_tag: str = "", **overrides: Any) -> tuple[dict[str, Any], str]:
    """``metadata.json``'s content and the card's text, written nowhere (``publish`` calls it to
    refuse a bad card config, domain or template before anything is exported)."""
    cfg = card_config(run_dir, card, **overrides)
    meta = run_metadata(run_dir, cfg)
    meta["pipeline_tag"] = pipeline_tag
    return meta, render_card(meta, domain_text, usage, cfg.template)


def write_card(run_dir: str | Path, out: str | Path, card: CardConfig | str | Path | None = None,
               domain_text: str = "", usage: str = "", pipeline_tag: str = "", **overrides: Any) -> Path:
    """Write ``OUT/README.md`` and ``OUT/metadata.json`` for a run; returns the card's path.

    ``overrides`` replace card-config fields (``name``, ``domain``, ``license``); empty values are
    ignored. ``pipeline_tag`` is set only by callers that checked the folder loads in that
    transformers pipeline (``publish``).
    """
    run_dir, out = Path(run_dir), Path(out)
    meta, text = card_text(run_dir, card, domain_text, usage, pipeline_tag, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metadata.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "README.md", text)
    return out / "README.md"


def write_run_card(run_dir: str | Path, name: str = "", domain_text: str = "", license_id: str = "",
                   domain: str = "", card: CardConfig | str | Path | None = None) -> Path:
    """Write ``RUN/model/README.md`` and ``RUN/model/metadata.json``; returns the card's path.

    ``card`` is a :class:`CardConfig` or its YAML file (default ``RUN/card.yaml`` if present);
    ``name``, ``license_id`` and ``domain`` override its fields when given.
    """
    return write_card(run_dir, Path(run_dir) / "model", card, domain_text,
                      name=name, license=license_id, domain=domain)

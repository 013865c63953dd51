"""Hugging Face transformers export: a CLIPModel / SiglipModel folder with its processor.

The folder holds the (merged) model's ``config.json`` and ``model.safetensors``, the tokenizer
(its ``model_max_length`` set to the run's context length) and an image processor that applies
the run's preprocessing (size, crop, mean, std, resampling filter), plus ``processor_config.json``
so that ``AutoProcessor`` loads both. It works with::

    transformers.pipeline("zero-shot-image-classification", model=DIR)
    transformers.AutoModel.from_pretrained(DIR); transformers.AutoProcessor.from_pretrained(DIR)

Runs whose backbone is a transformers CLIP/SigLIP (``model.kind: hf``) or SigLIP 2 export to this
format; an open_clip backbone exports with ``--format open_clip``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import (AutoImageProcessor, AutoProcessor, AutoTokenizer, CLIPImageProcessor, CLIPProcessor,
                          SiglipProcessor)

from ...base import Backbone, PreprocessConfig, require_rgb

# PIL resampling codes, as transformers image processors store them
RESAMPLE = {"bilinear": 2, "bicubic": 3}
_RESAMPLE_NAMES = {code: name for name, code in RESAMPLE.items()}


def preprocess_from_image_processor(processor: Any, overrides: dict[str, Any]) -> PreprocessConfig:
    """Read size, mean, std and filter from a CLIP/SigLIP image processor."""
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or processor.size
    if "shortest_edge" in size:
        image_size, mode = size["shortest_edge"], "shortest"
    else:
        image_size, mode = size["height"], "squash"
    if getattr(processor, "do_center_crop", False):
        mode = "shortest"
    resample = getattr(processor, "resample", 3)
    values = {
        "image_size": int(image_size),
        "mean": tuple(processor.image_mean),
        "std": tuple(processor.image_std),
        "interpolation": _RESAMPLE_NAMES.get(int(getattr(resample, "value", resample)), "bicubic"),
        "resize_mode": mode,
    }
    values.update(overrides)
    return PreprocessConfig(**values)


def image_processor_for(preprocess: PreprocessConfig, source: Any) -> Any:
    """An image processor of ``source``'s class (CLIPImageProcessor when it cannot centre-crop)
    whose resizing, cropping and normalisation are exactly ``preprocess``."""
    settings = {k: v for k, v in source.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    size = preprocess.image_size
    settings.update(image_mean=list(preprocess.mean), image_std=list(preprocess.std),
                    resample=RESAMPLE[preprocess.interpolation], do_resize=True, do_normalize=True)
    cls = type(source)
    if preprocess.resize_mode == "shortest":
        if "do_center_crop" not in settings:  # e.g. SiglipImageProcessor only squashes
            cls = CLIPImageProcessor
        settings.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True)
    else:
        settings["size"] = {"height": size, "width": size}
        if "do_center_crop" in settings:
            settings["do_center_crop"] = False
    processor = cls(**settings)
    check_expressed(preprocess, preprocess_from_image_processor(processor, {}), cls.__name__)
    return processor


def check_expressed(wanted: PreprocessConfig, expressed: PreprocessConfig, processor: str) -> None:
    """Refuse an export whose image processor would reload other preprocessing than the run's: a
    ``ValueError`` naming each ``model.preprocess`` key, the run's value and what ``processor`` gives."""
    want, got = wanted.to_dict(), expressed.to_dict()
    differ = [f"model.preprocess.{key}={want.get(key)!r} (the exported {processor} would give {got.get(key)!r})"
              for key in sorted(want.keys() | got.keys()) if want.get(key) != got.get(key)]
    if differ:
        raise ValueError(f"transformers export: {processor} cannot express the run's preprocessing: "
                         f"{'; '.join(differ)}; train with preprocessing it can express, or export with "
                         f"--format adapter")


def write_hf(model: Backbone, out: Path, processor_class: type | None = None,
             image_processor: Any = None) -> None:
    """Write ``model`` (a transformers backbone without adapters) into folder ``out``.

    ``processor_class`` defaults to CLIPProcessor / SiglipProcessor by model type, and the image
    processor to one that applies the run's preprocessing (:func:`image_processor_for`); a family
    with its own processor (SigLIP 2) passes both.
    """
    require_rgb(model.preprocess, "hf")
    config = model.config_dict()
    revision = {"revision": config["revision"]} if config.get("revision") else {}
    if image_processor is None:
        image_processor = image_processor_for(model.preprocess, AutoImageProcessor.from_pretrained(config["name"], **revision))
    tokenizer = AutoTokenizer.from_pretrained(config["name"], **revision, **tokenizer_settings(model))
    model.model.save_pretrained(out)
    processor_class = processor_class or (SiglipProcessor if model.is_siglip else CLIPProcessor)
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(out)
    AutoProcessor.from_pretrained(out)  # fail here, not in the user's hands, if the folder does not load


def tokenizer_settings(model: Backbone) -> dict[str, Any]:
    """Tokenizer settings saved with the export so that users tokenize as the kit does: truncation at
    the run's context length (``model_max_length``, which the kit reads back as the context length,
    and ``max_length``, which a processor called with ``truncation=True`` uses before it), and for
    SigLIP no attention mask (the kit's SigLIP, like the original, pads to the maximum length and
    attends to the padding)."""
    settings: dict[str, Any] = {"model_max_length": int(model.context_length), "max_length": int(model.context_length)}
    if model.is_siglip:
        settings["model_input_names"] = ["input_ids"]
    return settings

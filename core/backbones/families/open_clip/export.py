"""open_clip export: the folder layout ``open_clip.push_to_hf_hub`` writes.

``open_clip_config.json`` holds ``model_cfg`` (the architecture, with the run's context length)
and ``preprocess_cfg`` (the run's size, mean, std, interpolation and resize mode);
``open_clip_model.safetensors`` holds the full state dict of the (merged) model. Load it with::

    open_clip.create_model_and_transforms("local-dir:DIR")       # the folder itself
    open_clip.create_model_and_transforms("hf-hub:ORG/NAME")     # after uploading the folder
    open_clip.get_tokenizer("local-dir:DIR")
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import open_clip
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME

from ...base import Backbone, PreprocessConfig, require_rgb
from ....checkpoint import atomic_write_text, save_tensors

HF_HUB_PREFIX = "hf-hub:"


def architecture_config(name: str) -> dict[str, Any]:
    """open_clip's ``model_cfg`` of architecture ``name`` (a registered name or ``hf-hub:ORG/NAME``)."""
    if name.startswith(HF_HUB_PREFIX):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name[len(HF_HUB_PREFIX):], HF_CONFIG_NAME)  # cached when the run built the model
        model_cfg = json.loads(Path(path).read_text()).get("model_cfg")
    else:
        model_cfg = open_clip.get_model_config(name)
    if not model_cfg:
        raise ValueError(f"open_clip export: no model config for architecture {name!r} "
                         f"(registered names are listed by open_clip.list_models())")
    return copy.deepcopy(model_cfg)


def preprocess_cfg(preprocess: PreprocessConfig) -> dict[str, Any]:
    """The run's preprocessing in open_clip's ``PreprocessCfg`` vocabulary."""
    return {"size": preprocess.image_size, "mean": list(preprocess.mean), "std": list(preprocess.std),
            "interpolation": preprocess.interpolation, "resize_mode": preprocess.resize_mode}


def write_open_clip(model: Backbone, out: Path) -> None:
    """Write ``model`` (an ``open_clip`` backbone without adapters) into folder ``out``."""
    require_rgb(model.preprocess, "open_clip")
    config = model.config_dict()
    model_cfg = architecture_config(config["name"])
    if config.get("context_length"):
        model_cfg.setdefault("text_cfg", {})["context_length"] = int(config["context_length"])
    visual_size = getattr(model.model.visual, "image_size", None)
    if visual_size is not None:
        visual_size = tuple(visual_size) if isinstance(visual_size, (tuple, list)) else (visual_size, visual_size)
        wanted = (model.preprocess.image_size,) * 2
        if tuple(int(v) for v in visual_size) != wanted:
            # open_clip always preprocesses to the vision tower's own input size
            raise ValueError(f"open_clip export: the run preprocesses to {wanted} but the vision tower takes "
                             f"{visual_size}; open_clip would resize to {visual_size}")
    save_tensors(model.model.state_dict(), out / HF_SAFE_WEIGHTS_NAME, metadata={"format": "pt"})
    tokenizer = getattr(model.text_tokenizer, "tokenizer", None)
    if hasattr(tokenizer, "save_pretrained"):  # HF tokenizers: local-dir loading reads them from the folder
        tokenizer.save_pretrained(out)
    hub_config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(model.preprocess)}
    atomic_write_text(out / HF_CONFIG_NAME, json.dumps(hub_config, indent=2) + "\n")

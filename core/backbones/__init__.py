"""Backbones behind one interface; each family (open_clip, Hugging Face CLIP/SigLIP, SigLIP 2, the
dual encoder) is one package under ``families/``, found and registered on import."""
from .base import Backbone, PreprocessConfig, TokenFeatures, Tokens, TowerPreset
from .factory import (BACKBONES, ModelConfig, backbone_class, create_backbone, export_formats_for_kind,
                      model_config_from_folder, register_backbone)
from . import families  # noqa: F401,E402  (imports every family package: registers the kinds)

__all__ = ["BACKBONES", "Backbone", "ModelConfig", "PreprocessConfig", "TokenFeatures", "Tokens", "TowerPreset",
           "backbone_class", "create_backbone", "export_formats_for_kind", "model_config_from_folder",
           "register_backbone"]

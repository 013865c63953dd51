"""Backbones: open_clip, Hugging Face CLIP/SigLIP and a dual encoder, behind one interface."""
from .base import Backbone, PreprocessConfig, Tokens
from .factory import BACKBONES, ModelConfig, create_backbone, register_backbone
from . import compact_base, dual_encoder, hf, open_clip  # noqa: F401  (registers the kinds)

__all__ = ["Backbone", "PreprocessConfig", "Tokens", "ModelConfig", "BACKBONES", "create_backbone",
           "register_backbone"]

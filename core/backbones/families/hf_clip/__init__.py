"""Hugging Face CLIP / SigLIP family (``model.kind: hf``)."""
from .backbone import HFClipBackbone, hf_model_type
from .export import preprocess_from_image_processor

__all__ = ["HFClipBackbone", "hf_model_type", "preprocess_from_image_processor"]

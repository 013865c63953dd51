"""Dual-encoder family: any vision tower + any Hugging Face text encoder (``model.kind: dual_encoder``),
and the kit's offline compact base built that way (``model.kind: compact_base``)."""
from .backbone import DualEncoder, build_projection, resolve_text_path
from .compact_base import CompactBase, default_folder, dual_encoder_config

__all__ = ["CompactBase", "DualEncoder", "build_projection", "default_folder", "dual_encoder_config",
           "resolve_text_path"]

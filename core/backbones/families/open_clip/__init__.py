"""open_clip family: any open_clip architecture (``model.kind: open_clip``)."""
from .backbone import MODEL_CONFIG_DIR, OpenClipBackbone, preprocess_from_open_clip

__all__ = ["MODEL_CONFIG_DIR", "OpenClipBackbone", "preprocess_from_open_clip"]

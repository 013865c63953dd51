"""SigLIP 2 family (``model.kind: siglip2``): transformers' ``Siglip2Model`` (NaFlex patch input).

Added as the proof that a family is one folder: this package touches no other module.
"""
from .backbone import Siglip2Backbone, patchify

__all__ = ["Siglip2Backbone", "patchify"]

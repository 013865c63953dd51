"""Adapt a CLIP vision tower to N input bands (multispectral) without losing its RGB knowledge.

The first layer of a ViT is a patch-embedding convolution with 3 input channels. For bands
``band_names`` (e.g. ``["B02", "B03", "B04", "B08"]``) and the names that play red, green and
blue (``rgb=("B04", "B03", "B02")``), :func:`expand_rgb_filters` builds the N-channel weight by
this rule:

* the band named ``rgb[0]`` gets the pretrained red filter, ``rgb[1]`` green, ``rgb[2]`` blue,
  unchanged, so an image whose other bands are zero gives exactly the RGB model's output;
* every other band gets the mean of the three RGB filters scaled by 3/N, so a new band starts
  as a "grey" input whose total contribution shrinks as more bands are added (with all N bands
  carrying the same signal, the extra bands add ``(N-3)/N`` of one grey filter's response).

:func:`adapt_vision_tower` swaps the convolution in place for open_clip ViTs, Hugging Face CLIP
(also updating ``vision_config.num_channels`` so ``save_pretrained`` records it) and the dual
encoder's timm / open_clip ViT (the compact base), and sets the backbone's preprocessing to the
given per-band mean and std (``PreprocessConfig.channels`` becomes N).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from domainclip.core.backbones.base import Backbone


def expand_rgb_filters(weight: torch.Tensor, band_names: Sequence[str], rgb: Sequence[str]) -> torch.Tensor:
    """``(O, 3, kh, kw)`` RGB filters -> ``(O, N, kh, kw)`` filters for ``band_names`` (rule above)."""
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected RGB filters of shape (out, 3, kh, kw), got {tuple(weight.shape)}")
    if len(rgb) != 3:
        raise ValueError(f"rgb must name the red, green and blue bands, got {list(rgb)}")
    missing = [name for name in rgb if name not in band_names]
    if missing:
        raise ValueError(f"rgb bands {missing} are not among band_names {list(band_names)}")
    count = len(band_names)
    grey = weight.mean(dim=1) * (3.0 / count)
    columns = [weight[:, list(rgb).index(name)] if name in rgb else grey for name in band_names]
    return torch.stack(columns, dim=1).contiguous()


def adapt_vision_tower(backbone: Backbone, band_names: Sequence[str], rgb: Sequence[str],
                       mean: Sequence[float], std: Sequence[float], reader: dict | None = None) -> Backbone:
    """Make ``backbone``'s image tower take ``len(band_names)`` bands (in place; returns it).

    ``reader`` becomes ``preprocess.reader`` (how data sets open the N-band files, e.g.
    ``{"name": "geotiff", "bands": [...]}``); None keeps the current one.
    """
    if not len(band_names) == len(mean) == len(std):
        raise ValueError(f"need one mean and std per band: {len(band_names)} bands, {len(mean)} means, {len(std)} stds")
    owner, attribute = backbone.patch_embedding()
    conv: nn.Conv2d = getattr(owner, attribute)
    new = nn.Conv2d(len(band_names), conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    bias=conv.bias is not None, dtype=conv.weight.dtype, device=conv.weight.device)
    with torch.no_grad():
        new.weight.copy_(expand_rgb_filters(conv.weight, band_names, rgb))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    setattr(owner, attribute, new)
    if hasattr(owner, "num_channels"):
        owner.num_channels = len(band_names)
    config = getattr(getattr(backbone, "model", None), "config", None)
    if config is not None and hasattr(getattr(config, "vision_config", None), "num_channels"):
        config.vision_config.num_channels = len(band_names)
    old = backbone.preprocess
    backbone.preprocess = dataclasses.replace(old, mean=tuple(mean), std=tuple(std),
                                              reader=dict(reader) if reader is not None else old.reader)
    return backbone

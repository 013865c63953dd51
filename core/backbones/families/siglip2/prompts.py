"""MaPLe's vision prompts on the SigLIP 2 image tower (its text tower is SigLIP's: ``SiglipTextEncoder``)."""
from __future__ import annotations

import torch

from ..hf_clip.prompts import SiglipVisionEncoder


class Siglip2VisionEncoder(SiglipVisionEncoder):
    """SigLIP's prompt-aware image tower with SigLIP 2's patch embedding (flattened patches + grid shape)."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        inputs = self.backbone.vision_inputs(images)
        return self.vision.embeddings(inputs["pixel_values"], inputs["spatial_shapes"])

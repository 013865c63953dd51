"""Tie refinement: bf16 / fp16 speed with the classification decisions of fp32.

Holding the frozen weights in bf16 moves every class logit a little (measured once with the compact
base on the shared zero-shot sets: at most 0.07 to 0.3 logits, against median top-1 margins of 1.5
to 4), so bf16 can only change an
image's top-1 class where fp32 itself had a near tie. :class:`TieRefiner` re-encodes exactly those
images with the weights in fp32 and keeps the fp32 features for them:

1. the first batch is encoded in both precisions (calibration): the largest change of the top-1
   margin between them is the *band*;
2. every later image whose low-precision margin (top-1 logit minus the runner-up's) is below
   ``safety x band`` is re-encoded in fp32; each re-encoded image measures the margin change
   again and widens the band when it is larger.

The images outside the band keep their low-precision features: their decision could only change
if bf16 moved their margin by more than ``safety`` times the largest move observed on every image
encoded both ways so far. That is a measured bound, not a proof: the precision guard
(``domainclip precision-guard --refine-ties``) checks it on a recipe's own data. Margins are in
the units of the logits that decide (class logits, 100 x cosine for the prompt ensemble).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..encode import FrozenEncoder

TIE_SAFETY = 2.0
"""Re-encode images whose margin is below this multiple of the largest margin change observed.
Replaying the shared zero-shot sets' fp32 and bf16 features in batches of 16, 1.0 already gave
100 % agreement with fp32; 2.0 leaves room for tails the calibration has not seen."""

LogitsFn = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["TIE_SAFETY", "TieRefiner"]


class TieRefiner:
    """Re-encodes in fp32 the images whose low-precision top-1 decision is near a tie.

    Args:
        encoder: the low-precision encoder whose features are refined.
        logits_fn: normalised features (N, D) float32 on the encoder's device -> class logits (N, C).
        safety: multiple of the observed margin change below which an image is re-encoded.
        reference: the fp32 encoder (default: ``FrozenEncoder(encoder.source, "fp32")``, which runs
            the source model itself when it is fp32 already, so no second copy of the weights).

    With an fp32 ``encoder`` or fewer than two classes, :meth:`refine` returns the features unchanged.
    """

    def __init__(self, encoder: FrozenEncoder, logits_fn: LogitsFn, safety: float = TIE_SAFETY,
                 reference: FrozenEncoder | None = None):
        if not safety > 0:
            raise ValueError(f"tie refinement safety must be > 0, got {safety}")
        self.encoder = encoder
        self.logits_fn = logits_fn
        self.safety = float(safety)
        self.active = encoder.precision != "fp32"
        if reference is None and self.active:
            reference = FrozenEncoder(encoder.source, "fp32", encoder.device)
        self.reference = reference
        self.band: float | None = None
        """Largest change of the top-1 margin seen between the two precisions (None: not calibrated)."""
        self.images = 0
        self.refined = 0

    def refine(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``features`` (the encoder's, of ``images``) with the rows of near-tied images replaced by fp32 ones."""
        self.images += features.shape[0]
        if not self.active or features.shape[0] == 0:
            return features
        logits = self.logits_fn(features).float()
        if logits.shape[-1] < 2:
            return features
        top2 = logits.topk(2, dim=-1).indices
        margins = _margins(logits, top2)
        near = torch.ones_like(margins, dtype=torch.bool) if self.band is None else \
            margins < self.safety * self.band
        if not near.any():
            return features
        rows = near.nonzero().flatten()
        exact = self.reference.encode_image(images[rows.to(images.device)]).to(features.device)
        exact_margins = _margins(self.logits_fn(exact).float(), top2[rows])
        change = float((exact_margins - margins[rows]).abs().max())
        self.band = change if self.band is None else max(self.band, change)
        self.refined += int(rows.numel())
        features = features.clone()
        features[rows] = exact
        return features

    def stats(self) -> dict[str, Any]:
        """Images seen, images re-encoded in fp32, the band and the safety factor (for reports)."""
        return {"images": self.images, "refined": self.refined, "band": self.band, "safety": self.safety,
                "precision": self.encoder.precision}


def _margins(logits: torch.Tensor, top2: torch.Tensor) -> torch.Tensor:
    """Logit of each row's first class in ``top2`` minus its second's (the low-precision top-2)."""
    picked = logits.gather(1, top2)
    return picked[:, 0] - picked[:, 1]

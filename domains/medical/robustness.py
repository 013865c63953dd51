"""Corruption set ``chest_xray`` for ``robustness.corruptions``: no flips (left and right are
anatomy on a chest film: a flipped heart is a different finding), no brightness shift beyond
what exposure varies (contrast covers it)."""
from __future__ import annotations

from domainclip.core.robustness import register_corruption_set

register_corruption_set("chest_xray", ("gaussian_noise", "gaussian_blur", "jpeg", "contrast"))

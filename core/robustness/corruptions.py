"""Common image corruptions on [0, 1] pixels, and named sets of them chosen per domain.

Each corruption is registered in one line (:func:`register_corruption`) as
``fn(pixels, severity, generator) -> pixels`` on a (B, C, H, W) batch, severity 1..5 following
ImageNet-C's levels (Hendrycks & Dietterich 2019) where it defines them. A *set* lists the
corruptions that make sense for a domain's images (:func:`register_corruption_set`): core's
``default`` includes a horizontal flip, the medical domain's ``chest_xray`` does not (left and
right are anatomy there). Eval tasks pick a set by name (``robustness.corruptions``).
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ..plugins import require_registered

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]
CORRUPTIONS: dict[str, Corruption] = {}
CORRUPTION_SETS: dict[str, tuple[str, ...]] = {}


def register_corruption(name: str) -> Callable[[Corruption], Corruption]:
    """Decorator: make ``name`` usable in corruption sets."""

    def register(fn: Corruption) -> Corruption:
        CORRUPTIONS[name] = fn
        return fn

    return register


def register_corruption_set(name: str, corruptions: Sequence[str]) -> None:
    """Name a list of registered corruptions (a domain calls this on import)."""
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"corruption set {name!r}: {unknown} are not registered corruptions "
                         f"(registered: {sorted(CORRUPTIONS)})")
    if name in CORRUPTION_SETS and CORRUPTION_SETS[name] != tuple(corruptions):
        raise ValueError(f"corruption set {name!r} is registered twice with different corruptions")
    CORRUPTION_SETS[name] = tuple(corruptions)


def corruption_set(name: str) -> tuple[str, ...]:
    """The corruptions of set ``name`` (empty name = none); unknown names fail naming the closest."""
    if not name:
        return ()
    require_registered(name, CORRUPTION_SETS, f"robustness.corruptions {name!r} is not a registered corruption set")
    return CORRUPTION_SETS[name]


def corrupt(name: str, pixels: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """``pixels`` (B, C, H, W) in [0, 1] with corruption ``name`` at ``severity`` (1..5)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"{name!r} is not a registered corruption (registered: {sorted(CORRUPTIONS)})")
    if not 1 <= severity <= 5:
        raise ValueError(f"corruption severity must be in 1..5, got {severity}")
    return CORRUPTIONS[name](pixels, severity, generator).clamp(0.0, 1.0)


@register_corruption("gaussian_noise")
def gaussian_noise(pixels: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    noise = torch.randn(pixels.shape, generator=generator, dtype=pixels.dtype).to(pixels.device)
    return pixels + sigma * noise


@register_corruption("gaussian_blur")
def gaussian_blur(pixels: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    # ImageNet-C's sigmas are for 224-pixel images; scaled to the image so small inputs blur alike
    sigma = (1.0, 2.0, 3.0, 4.0, 6.0)[severity - 1] * min(pixels.shape[-2:]) / 224
    if sigma < 0.1:
        return pixels
    kernel = min(2 * math.ceil(3 * sigma) + 1, 2 * min(pixels.shape[-2:]) - 1)
    return TF.gaussian_blur(pixels, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


@register_corruption("jpeg")
def jpeg(pixels: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    quality = (25, 18, 15, 10, 7)[severity - 1]
    as_bytes = (pixels.detach().cpu() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    decoded = []
    for image in as_bytes:
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=quality)
        array = np.asarray(Image.open(buffer)).reshape(image.shape)
        decoded.append(torch.from_numpy(array.copy()))
    return torch.stack(decoded).permute(0, 3, 1, 2).to(device=pixels.device, dtype=pixels.dtype) / 255


@register_corruption("contrast")
def contrast(pixels: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    factor = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    mean = pixels.mean(dim=(-3, -2, -1), keepdim=True)
    return (pixels - mean) * factor + mean


@register_corruption("brightness")
def brightness(pixels: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    return pixels + (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]


@register_corruption("hflip")
def hflip(pixels: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    return pixels.flip(-1)


register_corruption_set("default", ("gaussian_noise", "gaussian_blur", "jpeg", "contrast", "brightness", "hflip"))
register_corruption_set("no_flip", ("gaussian_noise", "gaussian_blur", "jpeg", "contrast", "brightness"))

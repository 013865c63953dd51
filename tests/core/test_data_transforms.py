"""build_image_transform against hand computations and PIL references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from domainclip.core.backbones.base import PreprocessConfig
from domainclip.core.data import build_image_transform

MEAN = (0.4, 0.5, 0.6)
STD = (0.2, 0.25, 0.5)


def normalise_by_hand(pixels: np.ndarray) -> torch.Tensor:
    """uint8 H x W x 3 -> (3, H, W): (pixel / 255 - mean) / std, channel by channel."""
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float64)
    for channel in range(3):
        out[channel] = (pixels[..., channel] / 255.0 - MEAN[channel]) / STD[channel]
    return torch.from_numpy(out).float()


def test_eval_normalisation_matches_hand_computation() -> None:
    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3) * 5
    transform = build_image_transform(PreprocessConfig(image_size=4, mean=MEAN, std=STD), train=False)
    out = transform(Image.fromarray(pixels))
    assert out.dtype == torch.float32 and out.shape == (3, 4, 4)
    torch.testing.assert_close(out, normalise_by_hand(pixels), rtol=0, atol=1e-6)


def test_shortest_mode_centre_crops_the_long_side() -> None:
    # 8 wide x 4 high; shortest side already 4, so the output is columns 2..5 exactly
    pixels = np.zeros((4, 8, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(8, dtype=np.uint8)[None, :] * 30
    transform = build_image_transform(PreprocessConfig(image_size=4, mean=MEAN, std=STD), train=False)
    torch.testing.assert_close(transform(Image.fromarray(pixels)), normalise_by_hand(pixels[:, 2:6]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("interpolation, pil_filter", [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)])
def test_squash_mode_equals_pil_resize_of_both_sides(interpolation: str, pil_filter: int) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(10, 30, 3), dtype=np.uint8)
    config = PreprocessConfig(image_size=6, mean=MEAN, std=STD, interpolation=interpolation, resize_mode="squash")
    reference = np.asarray(Image.fromarray(pixels).resize((6, 6), pil_filter))
    torch.testing.assert_close(build_image_transform(config, train=False)(Image.fromarray(pixels)),
                               normalise_by_hand(reference), rtol=0, atol=1e-6)


def test_shortest_mode_resizes_then_crops_like_pil() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    config = PreprocessConfig(image_size=6, mean=MEAN, std=STD, interpolation="bicubic")
    resized = np.asarray(Image.fromarray(pixels).resize((10, 6), Image.BICUBIC))  # short side 12 -> 6, long 20 -> 10
    torch.testing.assert_close(build_image_transform(config, train=False)(Image.fromarray(pixels)),
                               normalise_by_hand(resized[:, 2:8]), rtol=0, atol=1e-6)


def test_train_transform_shape_and_full_scale_keeps_content_range() -> None:
    pixels = np.full((30, 50, 3), 128, dtype=np.uint8)
    transform = build_image_transform(PreprocessConfig(image_size=16, mean=MEAN, std=STD), train=True)
    out = transform(Image.fromarray(pixels))
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out, normalise_by_hand(np.full((16, 16, 3), 128, dtype=np.uint8)), rtol=0, atol=1e-6)


def test_grey_preprocess_gives_one_channel_and_bad_channel_counts_fail() -> None:
    transform = build_image_transform(PreprocessConfig(image_size=4, mean=(0.5,), std=(0.5,)), train=False)
    out = transform(Image.new("RGB", (4, 4), (255, 255, 255)))
    assert out.shape == (1, 4, 4)
    torch.testing.assert_close(out, torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="preprocess has 2 channels"):
        build_image_transform(PreprocessConfig(mean=(0.5, 0.5), std=(1.0, 1.0)), train=False)


def test_invalid_scale_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"scale must satisfy 0 < low <= high <= 1, got \(0.9, 0.5\)"):
        build_image_transform(PreprocessConfig(), train=True, scale=(0.9, 0.5))

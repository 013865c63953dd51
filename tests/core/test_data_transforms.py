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


def v2_to_normalised(mean, std):  # noqa: ANN001, ANN201 - what ToNormalizedTensor replaces
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])


@pytest.mark.parametrize("kind", ["rgb", "grey", "grey_to_three_channels", "uint8_batch", "float_tensor", "tv_image"])
def test_to_normalized_tensor_equals_v2_bit_for_bit(kind: str) -> None:
    from torchvision import tv_tensors

    from domainclip.core.data.transforms import ToNormalizedTensor

    rng = np.random.default_rng(7)
    mean, std = (MEAN[:1], STD[:1]) if kind == "grey" else (MEAN, STD)
    rgb = rng.integers(0, 256, size=(9, 13, 3), dtype=np.uint8)
    image = {"rgb": lambda: Image.fromarray(rgb),
             "grey": lambda: Image.fromarray(rgb[..., 0]),
             "grey_to_three_channels": lambda: Image.fromarray(rgb[..., 0]),  # broadcast, as v2 does
             "uint8_batch": lambda: torch.from_numpy(rgb).permute(2, 0, 1).expand(4, 3, 9, 13).contiguous(),
             "float_tensor": lambda: torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
             "tv_image": lambda: tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1))}[kind]()
    ours, reference = ToNormalizedTensor(mean, std)(image), v2_to_normalised(mean, std)(image)
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    assert torch.equal(ours, reference)
    if kind not in ("float_tensor", "tv_image"):  # those take v2's own steps
        assert ours.is_contiguous()
    if kind == "rgb":  # why v2 is slow here: it normalises a channels-last strided tensor
        assert not reference.is_contiguous()


def test_to_normalized_tensor_fails_where_v2_fails() -> None:
    from domainclip.core.data.transforms import ToNormalizedTensor

    rgba = Image.fromarray(np.zeros((4, 4, 4), dtype=np.uint8), "RGBA")  # 4 channels against 3 means
    with pytest.raises(RuntimeError, match="must match the size"):
        v2_to_normalised(MEAN, STD)(rgba)
    with pytest.raises(RuntimeError, match="must match the size"):
        ToNormalizedTensor(MEAN, STD)(rgba)


def test_eval_transform_output_equals_the_v2_pipeline_on_a_real_sized_image() -> None:
    from torchvision.transforms import InterpolationMode, v2

    config = PreprocessConfig(image_size=224, mean=MEAN, std=STD, interpolation="bicubic")
    pixels = np.random.default_rng(3).integers(0, 256, size=(256, 300, 3), dtype=np.uint8)
    reference = v2.Compose([v2.Resize(224, interpolation=InterpolationMode.BICUBIC, antialias=True),
                            v2.CenterCrop(224), v2_to_normalised(MEAN, STD)])
    assert torch.equal(build_image_transform(config, train=False)(Image.fromarray(pixels)),
                       reference(Image.fromarray(pixels)))


def test_to_normalized_tensor_refuses_a_zero_std_and_mismatched_channels() -> None:
    from domainclip.core.data.transforms import ToNormalizedTensor

    with pytest.raises(ValueError, match=r"std must not contain 0"):
        ToNormalizedTensor(MEAN, (0.2, 0.0, 0.5))
    with pytest.raises(ValueError, match="mean has 3 channels but std has 2"):
        ToNormalizedTensor(MEAN, STD[:2])


def test_crop_scale_one_trains_on_the_evaluation_geometry() -> None:
    """crop_scale (1, 1) turns the random crop off; RandomResizedCrop would squash a non-square image."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    preprocess = PreprocessConfig(image_size=32)
    train = build_image_transform(preprocess, train=True, scale=(1.0, 1.0))
    torch.testing.assert_close(train(image), build_image_transform(preprocess, train=False)(image))

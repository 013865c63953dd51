"""field_photo augmentation: registered by name, background replaced only behind the leaf, seeded."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from domainclip.core.backbones.base import PreprocessConfig
from domainclip.core.data.dataset import apply_transform
from domainclip.core.data.transforms import build_train_transform
from domainclip.domains.agriculture.transforms import FieldPhotoAugment, background_mask, random_background

from .make_fake_data import leaf_image

PRE = PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def leaf() -> Image.Image:
    return leaf_image((40, 160, 50), 32, np.random.default_rng(0))


def to_pixels(tensor: torch.Tensor) -> torch.Tensor:
    return tensor * 0.25 + 0.5


def test_registered_by_name_with_options() -> None:
    transform = build_train_transform(PRE, {"name": "field_photo", "lighting": 0.2, "blur": 0.0}, (0.7, 1.0))
    assert isinstance(transform, FieldPhotoAugment) and transform.crop.scale == (0.7, 1.0)
    out = apply_transform(transform, leaf(), 0, 0, 1)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="bad options for transform 'field_photo'"):
        build_train_transform(PRE, {"name": "field_photo", "sharpness": 1.0})
    with pytest.raises(ValueError, match=r"invalid \['zoom_out'\]"):
        build_train_transform(PRE, {"name": "field_photo", "zoom_out": [0.5, 1.5]})


def test_background_replaced_leaf_kept() -> None:
    identity = dict(scale=(1.0, 1.0), lighting=0.0, blur=0.0, zoom_out=(1.0, 1.0))
    image = leaf()
    plain = FieldPhotoAugment(32, PRE.mean, PRE.std, background=0.0, **identity)
    field = FieldPhotoAugment(32, PRE.mean, PRE.std, background=1.0, **identity)
    original = to_pixels(apply_transform(plain, image, 1))
    augmented = to_pixels(apply_transform(field, image, 1))
    mask = background_mask(original, 0.1)
    assert 0.1 < mask.float().mean() < 0.9
    torch.testing.assert_close(augmented[:, ~mask], original[:, ~mask], atol=1e-5, rtol=0)  # the leaf is untouched
    assert float(augmented[:, mask].mean()) > 0.1  # the black background is now a soil/foliage texture
    assert float(original[:, mask].max()) < 0.1


def test_seeded_and_varied() -> None:
    augment = FieldPhotoAugment(32, PRE.mean, PRE.std, blur=0.5, background=0.5)
    image = leaf()
    torch.testing.assert_close(apply_transform(augment, image, 3, 0, 5), apply_transform(augment, image, 3, 0, 5))
    assert not torch.equal(apply_transform(augment, image, 3, 0, 5), apply_transform(augment, image, 3, 1, 5))


def test_zoom_out_shrinks_leaf() -> None:
    image = leaf()
    base = dict(scale=(1.0, 1.0), lighting=0.0, blur=0.0, background=0.0)
    full = to_pixels(apply_transform(FieldPhotoAugment(32, PRE.mean, PRE.std, zoom_out=(1.0, 1.0), **base), image, 2))
    small = to_pixels(apply_transform(FieldPhotoAugment(32, PRE.mean, PRE.std, zoom_out=(0.5, 0.5), **base), image, 2))
    green = lambda x: ((x[1] > 0.45) & (x[0] < 0.3)).float().sum()  # noqa: E731  (leaf pixels)
    assert 0.15 < float(green(small) / green(full)) < 0.4  # a quarter of the area, give or take edges


def test_background_texture_range() -> None:
    torch.manual_seed(0)
    texture = random_background(20, 30)
    assert texture.shape == (3, 20, 30) and 0.0 <= float(texture.min()) and float(texture.max()) <= 1.0
    assert float(texture.std()) > 0.01

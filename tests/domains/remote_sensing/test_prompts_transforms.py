"""Class-name normalisation, overhead prompts, and the caption-consistent overhead augmentation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from domainclip.core.backbones.base import PreprocessConfig
from domainclip.core.data.dataset import ImageTextDataset
from domainclip.core.data.records import ImageTextRecord
from domainclip.core.data.transforms import build_train_transform
from domainclip.domains.remote_sensing import RSICD_CLASS_NAMES, normalise_class_name
from domainclip.domains.remote_sensing.orientation import has_direction_words, rewrite_caption
from domainclip.domains.remote_sensing.transforms import OverheadAugment, OverheadAugmentd

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


def test_rsicd_names_match_the_shipped_recipes() -> None:
    base = yaml.safe_load((RECIPES / "compare" / "rsicd_scenes_b2n.base.yaml").read_text())
    assert RSICD_CLASS_NAMES == base["data"]["train"]["class_names"]
    assert len(RSICD_CLASS_NAMES) == 30


@pytest.mark.parametrize("raw,natural", [("denseresidential", "dense residential area"),
                                         ("Dense_Residential", "dense residential area"),
                                         ("ground_track_field", "ground track field"),
                                         ("AnnualCrop", "annual crop land"),
                                         ("SomethingNew_here", "something new here"),
                                         ("center", "city center")])
def test_normalise_class_name(raw: str, natural: str) -> None:
    assert normalise_class_name(raw) == natural


def test_direction_words_and_rewrites() -> None:
    assert has_direction_words("a river on the Left of the town") and not has_direction_words("a leftover lot")
    assert rewrite_caption("Top-left: a pond, east of the upper road", ["hflip"]) == "Top-right: a pond, west of the upper road"
    assert rewrite_caption("Top-left: a pond, east of the upper road", ["vflip"]) == "Bottom-left: a pond, east of the lower road"
    assert rewrite_caption("the NORTHEAST corner", ["hflip", "vflip"]) == "the SOUTHWEST corner"


def half_image(size: int = 16) -> Image.Image:
    """Left half white, right half black, top row marked: flips are visible in the pixels."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:, : size // 2] = 255
    pixels[0, :, 2] = 128
    return Image.fromarray(pixels)


def left_is_bright(tensor: torch.Tensor) -> bool:
    width = tensor.shape[-1]
    return bool(tensor[0, :, : width // 2].mean() > tensor[0, :, width // 2:].mean())


PREPROCESS = PreprocessConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def run_many(transform: OverheadAugmentd, caption: str, times: int = 40) -> list[tuple[torch.Tensor, str]]:
    out = []
    for seed in range(times):
        torch.manual_seed(seed)
        result = transform({"image": half_image(), "caption": caption})
        out.append((result["image"], result["caption"]))
    return out


def test_rewrite_policy_keeps_the_caption_true_to_the_image() -> None:
    transform = build_train_transform(PREPROCESS, {"name": "overhead", "caption_policy": "rewrite"}, (1.0, 1.0))
    assert isinstance(transform, OverheadAugmentd) and transform.takes_caption
    results = run_many(transform, "a bright field on the left")
    assert {caption for _, caption in results} == {"a bright field on the left", "a bright field on the right"}
    for image, caption in results:  # the caption names the side that is bright in the augmented pixels
        assert left_is_bright(image) == caption.endswith("left")
        assert image.shape == (3, 16, 16)


def test_skip_policy_applies_no_orientation_change_to_directional_captions() -> None:
    transform = build_train_transform(PREPROCESS, {"name": "overhead", "caption_policy": "skip"}, (1.0, 1.0))
    reference = (torch.from_numpy(np.asarray(half_image(), np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5
    for image, caption in run_many(transform, "a bright field on the left", times=10):
        assert caption == "a bright field on the left"
        assert torch.allclose(image, reference, atol=1e-5)


def test_free_captions_get_all_eight_orientations_and_dataset_runs_are_reproducible(tmp_path: Path) -> None:
    transform = build_train_transform(PREPROCESS, {"name": "overhead"}, (1.0, 1.0))
    seen = {tuple(image[2].flatten().tolist()) for image, caption in run_many(transform, "a bright field", times=80)}
    assert len(seen) == 8  # the dihedral group D4 of an asymmetric image
    half_image().save(tmp_path / "a.png")
    records = [ImageTextRecord(str(tmp_path / "a.png"), ["houses at the top"], -1)] * 6
    first = [ImageTextDataset(records, transform, seed=5)[i] for i in range(6)]
    again = [ImageTextDataset(records, transform, seed=5)[i] for i in range(6)]
    assert all(torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] for a, b in zip(first, again))
    assert {item["caption"] for item in first} <= {"houses at the top", "houses at the bottom"}


def test_multispectral_bands_are_augmented_without_hue_shift() -> None:
    augment = OverheadAugment(12, mean=[0.0] * 6, std=[1.0] * 6, scale=(0.5, 1.0), brightness_contrast=0.2)
    torch.manual_seed(0)
    tensor, _ = augment(np.random.default_rng(0).random((20, 20, 6), dtype=np.float32))
    assert tensor.shape == (6, 12, 12)
    names = {type(t).__name__ for pipeline in augment.pipelines.values() for t in pipeline.transforms}
    assert "HueSaturationValue" not in names
    with pytest.raises(ValueError, match="hue is defined for 3-band RGB only.*6 bands"):
        OverheadAugment(12, mean=[0.0] * 6, std=[1.0] * 6, hue_shift=10)


def test_unknown_augment_name_and_bad_policy_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="'overhaed' is not a registered transform; did you mean 'overhead'"):
        build_train_transform(PREPROCESS, {"name": "overhaed"})
    with pytest.raises(ValueError, match="caption_policy must be one of"):
        build_train_transform(PREPROCESS, {"name": "overhead", "caption_policy": "ignore"})

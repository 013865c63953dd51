"""ImageTextDataset, image decoding and the Collator."""
from __future__ import annotations

import pickle
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from domainclip.core.backbones.base import PreprocessConfig
from domainclip.core.data import (
    BadImageError,
    Collator,
    ImageTextDataset,
    ImageTextRecord,
    build_image_transform,
    open_rgb_image,
    to_rgb,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import make_fake_images as fake  # noqa: E402
from ..conftest import shared_data_root  # noqa: E402


def shared_data() -> Path:
    return shared_data_root()


RSICD_IMAGES = shared_data() / "remote_sensing" / "rsicd" / "RSICD_images"
needs_rsicd = pytest.mark.skipif(
    not (RSICD_IMAGES / "viaduct_99.jpg").is_file(), reason=f"shared RSICD images not found at {RSICD_IMAGES}"
)
PREPROCESS = PreprocessConfig(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> fake.FakeData:
    return fake.make_fake_dataset(tmp_path_factory.mktemp("fake"))


@pytest.fixture(scope="module")
def noise_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    pixels = np.random.default_rng(1).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    return str(fake.write_image(tmp_path_factory.mktemp("noise") / "noise.png", Image.fromarray(pixels)))


def strong_train_transform():
    return build_image_transform(PREPROCESS, train=True, scale=(0.2, 1.0))


def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """Fake tokenizer: text lengths as ids, padded to 4 (module-level so it pickles)."""
    ids = torch.zeros((len(texts), 4), dtype=torch.long)
    for row, text in enumerate(texts):
        ids[row, : min(4, len(text))] = len(text)
    return {"input_ids": ids, "attention_mask": (ids > 0).long()}


# --- decoding -------------------------------------------------------------------------------------
def test_modes_convert_to_expected_rgb_pixels(data: fake.FakeData) -> None:
    special = data.special
    cmyk = np.asarray(open_rgb_image(special["cmyk"]), dtype=int)
    assert np.abs(cmyk - [255, 0, 0]).max() <= 2  # CMYK (0, 255, 255, 0) is pure red
    # 16-bit grey [[1000, 2000], [3000, 1000]] stretched by its range 1000..3000 to 0..255
    grey16 = np.asarray(open_rgb_image(special["grey16"]))
    assert grey16.shape == (2, 2, 3)
    np.testing.assert_array_equal(grey16[..., 0], np.round(np.array([[0, 1000], [2000, 0]]) / 2000 * 255))
    assert (grey16 == grey16[..., :1]).all()
    assert np.asarray(open_rgb_image(special["rgba"]))[0, 0].tolist() == [10, 20, 30]
    palette = np.asarray(open_rgb_image(special["palette"]))
    assert palette[0, 0].tolist() == [0, 0, 255] and palette[1, 1].tolist() == [255, 0, 0]
    assert np.asarray(open_rgb_image(special["grey"]))[3, 3].tolist() == [77, 77, 77]


def test_an_exif_orientation_is_applied(tmp_path) -> None:
    """A phone photo stored sideways with Orientation=6 (rotate 90 degrees) reaches the model upright."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (250, 0, 0)  # left half red, as stored
    stored = Image.fromarray(pixels)
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = np.asarray(open_rgb_image(tmp_path / "phone.jpg"))
    assert shown.shape == (40, 20, 3)  # portrait, as a viewer shows it
    assert shown[:20, :, 0].mean() > 200 and shown[20:, :, 0].mean() < 50  # the red half is now on top


def test_float_grey_is_scaled_by_its_range_and_nan_becomes_zero() -> None:
    pixels = np.array([[-1.0, 0.0], [3.0, np.nan]], dtype=np.float32)
    rgb = np.asarray(to_rgb(Image.fromarray(pixels)))  # mode "F"
    np.testing.assert_array_equal(rgb[..., 1], [[0, round(1 / 4 * 255)], [255, 0]])


@pytest.mark.parametrize(
    "name, reason",
    [
        ("lab", "unexpected image mode LAB"),
        ("truncated", "image file is truncated"),
        ("not_an_image", "cannot identify image file"),
    ],
)
def test_unusable_images_raise_bad_image_error_with_reason(data: fake.FakeData, name: str, reason: str) -> None:
    with pytest.raises(BadImageError, match=reason):
        open_rgb_image(data.special[name])


# --- dataset --------------------------------------------------------------------------------------
def test_bad_items_come_back_as_bad_dicts_with_reasons(data: fake.FakeData) -> None:
    records = [
        ImageTextRecord(str(data.root / fake.ROWS[0].image), ["ok"], 1),
        ImageTextRecord(str(data.special["truncated"]), ["t"]),
        ImageTextRecord(str(data.root / "missing.jpg"), ["m"]),
        ImageTextRecord(str(data.special["lab"]), ["l"]),
    ]
    dataset = ImageTextDataset(records, build_image_transform(PREPROCESS, train=False), train=False)
    good = dataset[0]
    assert good["caption"] == "ok" and good["label"] == 1 and good["index"] == 0
    assert good["image"].shape == (3, 8, 8)
    assert dataset[1]["bad"][0] == str(data.special["truncated"]) and "truncated" in dataset[1]["bad"][1]
    assert dataset[2] == {"bad": (str(data.root / "missing.jpg"), "file not found"), "index": 2}
    assert dataset[3] == {"bad": (str(data.special["lab"]), "unexpected image mode LAB"), "index": 3}


def test_eval_mode_always_uses_the_first_caption(data: fake.FakeData) -> None:
    record = ImageTextRecord(str(data.root / fake.ROWS[3].image), list(fake.ROWS[3].captions))
    dataset = ImageTextDataset([record] * 20, build_image_transform(PREPROCESS, train=False), train=False)
    assert {dataset[i]["caption"] for i in range(20)} == {fake.ROWS[3].captions[0]}


def test_same_item_same_epoch_gives_identical_tensor_and_caption(noise_image: str) -> None:
    captions = [f"caption {k}" for k in range(5)]
    dataset = ImageTextDataset([ImageTextRecord(noise_image, captions)] * 4, strong_train_transform(), seed=3)
    dataset.set_epoch(2)
    first, second = dataset[1], dataset[1]
    assert torch.equal(first["image"], second["image"]) and first["caption"] == second["caption"]
    torch.manual_seed(0)
    dataset[0]  # consuming random numbers elsewhere must not matter
    assert torch.equal(dataset[1]["image"], first["image"])
    other_seed = ImageTextDataset(dataset.records, strong_train_transform(), seed=4)
    other_seed.set_epoch(2)
    assert not torch.equal(other_seed[1]["image"], first["image"])


def test_global_torch_rng_is_left_untouched(noise_image: str) -> None:
    dataset = ImageTextDataset([ImageTextRecord(noise_image, ["a"])], strong_train_transform())
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    dataset[0]
    assert torch.equal(torch.rand(3), expected)


def test_epochs_change_crops_and_caption_draws(noise_image: str) -> None:
    captions = [f"caption {k}" for k in range(5)]
    dataset = ImageTextDataset([ImageTextRecord(noise_image, captions)] * 200, strong_train_transform(), seed=0)
    epoch0 = [dataset[i]["caption"] for i in range(200)]
    image0 = dataset[7]["image"]
    dataset.set_epoch(1)
    epoch1 = [dataset[i]["caption"] for i in range(200)]
    assert not torch.equal(dataset[7]["image"], image0)
    changed = sum(a != b for a, b in zip(epoch0, epoch1))
    assert changed > 100  # independent draws from 5 captions differ with probability 0.8
    counts = Counter(epoch0)
    assert set(counts) == set(captions) and min(counts.values()) > 20  # every caption drawn, roughly uniformly


def test_results_do_not_depend_on_worker_count(noise_image: str) -> None:
    captions = [f"caption {k}" for k in range(3)]
    dataset = ImageTextDataset([ImageTextRecord(noise_image, captions, k % 2) for k in range(12)], strong_train_transform())
    dataset.set_epoch(5)
    collate = Collator(tokenize)
    serial = list(DataLoader(dataset, batch_size=4, collate_fn=collate, num_workers=0))
    parallel = list(DataLoader(dataset, batch_size=4, collate_fn=collate, num_workers=2, multiprocessing_context="fork"))
    for one, two in zip(serial, parallel, strict=True):
        assert torch.equal(one["images"], two["images"]) and one["captions"] == two["captions"]
        assert torch.equal(one["tokens"]["input_ids"], two["tokens"]["input_ids"])


def test_set_epoch_reaches_persistent_workers(noise_image: str) -> None:
    dataset = ImageTextDataset([ImageTextRecord(noise_image, [f"c{k}" for k in range(50)])] * 8, strong_train_transform())
    loader = DataLoader(dataset, batch_size=8, collate_fn=Collator(), num_workers=1, persistent_workers=True,
                        multiprocessing_context="fork")
    expected = {}
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        expected[epoch] = [dataset[i]["caption"] for i in range(8)]
        assert next(iter(loader))["captions"] == expected[epoch]
    assert expected[0] != expected[1]


@needs_rsicd
def test_real_truncated_rsicd_image_is_bad_while_neighbours_load() -> None:
    names = ["viaduct_98.jpg", "viaduct_99.jpg", "viaduct_100.jpg"]
    records = [ImageTextRecord(str(RSICD_IMAGES / name), ["a viaduct"]) for name in names]
    dataset = ImageTextDataset(records, build_image_transform(PreprocessConfig(image_size=32), train=False), train=False)
    items = [dataset[i] for i in range(3)]
    assert items[0]["image"].shape == items[2]["image"].shape == (3, 32, 32)
    assert items[1]["bad"][0] == str(RSICD_IMAGES / "viaduct_99.jpg")
    assert "truncated" in items[1]["bad"][1]
    batch = Collator()(items)
    assert batch["indices"].tolist() == [0, 2] and len(batch["bad"]) == 1


# --- collator -------------------------------------------------------------------------------------
def test_collator_stacks_good_items_and_lists_bad_ones() -> None:
    items = [
        {"image": torch.full((3, 2, 2), 1.0), "caption": "ab", "label": 4, "index": 10},
        {"bad": ("x.jpg", "file not found"), "index": 11},
        {"image": torch.full((3, 2, 2), 2.0), "caption": "abc", "label": -1, "index": 12},
    ]
    batch = Collator(tokenize)(items)
    assert batch["images"].shape == (2, 3, 2, 2) and batch["images"][1, 0, 0, 0] == 2.0
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [4, -1]
    assert batch["indices"].tolist() == [10, 12]
    assert batch["bad"] == [("x.jpg", "file not found")]
    assert batch["captions"] == ["ab", "abc"]
    assert batch["tokens"]["input_ids"].tolist() == [[2, 2, 0, 0], [3, 3, 3, 0]]


def test_collator_all_bad_gives_zero_rows() -> None:
    batch = Collator(tokenize, image_shape=(3, 8, 8))([{"bad": ("a", "r1"), "index": 0}, {"bad": ("b", "r2"), "index": 1}])
    assert batch["images"].shape == (0, 3, 8, 8)
    assert batch["labels"].shape == (0,) and batch["indices"].shape == (0,)
    assert batch["tokens"]["input_ids"].shape == (0, 4) and set(batch["tokens"]) == {"input_ids", "attention_mask"}
    assert batch["bad"] == [("a", "r1"), ("b", "r2")]


def test_collator_without_tokenizer_has_no_tokens_and_stacks_multilabel_targets() -> None:
    items = [{"image": torch.zeros(3, 1, 1), "caption": "", "label": [1.0, 0.0, float("nan")], "index": i} for i in range(2)]
    batch = Collator()(items)
    assert "tokens" not in batch
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (2, 3)
    assert torch.isnan(batch["labels"][:, 2]).all()


def test_collator_pickles_with_a_module_level_tokenizer() -> None:
    restored = pickle.loads(pickle.dumps(Collator(tokenize)))
    assert restored.tokenize(["abc"])["input_ids"].tolist() == [[3, 3, 3, 0]]


class _FlipCaption:
    """A caption-rewriting augmentation in miniature: 'left' becomes 'right'."""

    takes_caption = True

    def __call__(self, sample: dict) -> dict:
        image = torch.zeros(3, 4, 4)
        return {"image": image, "caption": sample["caption"].replace("left", "right")}


def test_a_rewritten_caption_keeps_its_source_through_dataset_and_collator(noise_image: str) -> None:
    """Teachers that saw the un-augmented image (distill) look their text target up by the source."""
    dataset = ImageTextDataset([ImageTextRecord(noise_image, ["a tree on the left"])] * 2, _FlipCaption())
    item = dataset[0]
    assert item["caption"] == "a tree on the right" and item["source_caption"] == "a tree on the left"
    batch = Collator()([dataset[0], dataset[1], {"bad": ("x.png", "unreadable"), "index": 2}])
    assert batch["captions"] == ["a tree on the right"] * 2
    assert batch["source_captions"] == ["a tree on the left"] * 2

"""Zero-shot, multi-label and retrieval evaluation end to end with a small fake backbone.

Each evaluation is compared with a reference computed directly from the fake model's encoders
(prompt by prompt, image by image) and sklearn, so the tests check the batching, ordering,
skipping and counting, not just that something runs.
"""
from __future__ import annotations

import contextlib
import json
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score
from torch import nn

from domainclip.core.backbones.base import Backbone, PreprocessConfig
from domainclip.core.eval.metrics import retrieval_metrics
from domainclip.core.eval.multilabel import evaluate_multilabel, multilabel_probabilities
from domainclip.core.eval.retrieval import captions_from_records, evaluate_retrieval
from domainclip.core.eval.zeroshot import (
    build_zeroshot_classifier,
    class_prompts,
    encode_loader_images,
    evaluate_zeroshot,
)
from ..conftest import shared_data_root

VOCAB = 997
TEMPLATES = ["a photo of {}.", "an aerial image of {}.", "{}"]
CLASS_NAMES = ["airport", "beach", "dense residential", "forest"]


class FakeBackbone(Backbone):
    """Image: fixed random projection of 4x4-pooled pixels. Text: mean of hashed-word embeddings."""

    def __init__(self, embed_dim: int = 16, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.preprocess = PreprocessConfig(image_size=16)
        self.image_projection = nn.Parameter(torch.randn(3 * 16, embed_dim, generator=generator))
        self.word_embedding = nn.Parameter(torch.randn(VOCAB + 1, embed_dim, generator=generator))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        self.dropout = nn.Dropout(0.5)  # would make results random if evaluation ran in train mode
        self.calls: list[tuple[str, bool, bool]] = []  # (tower, grad enabled, training)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = [[zlib.crc32(word.encode()) % VOCAB + 1 for word in text.lower().split()] or [0] for text in texts]
        length = max(len(row) for row in ids)
        input_ids = torch.zeros(len(texts), length, dtype=torch.long)
        for row, row_ids in enumerate(ids):
            input_ids[row, : len(row_ids)] = torch.tensor(row_ids)
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(("image", torch.is_grad_enabled(), self.training))
        pooled = F.adaptive_avg_pool2d(images, 4).flatten(1)
        return self.dropout(pooled @ self.image_projection)

    def _text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls.append(("text", torch.is_grad_enabled(), self.training))
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        summed = (self.word_embedding[tokens["input_ids"]] * mask).sum(dim=1)
        return self.dropout(summed / mask.sum(dim=1).clamp(min=1))

    @property
    def embed_dim(self) -> int:
        return self.image_projection.shape[1]


def reference_classifier(model: FakeBackbone, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """Prompt by prompt: normalise, average per class, normalise again; (D, C)."""
    model.eval()
    columns = []
    with torch.no_grad():
        for name in class_names:
            prompts = [template.replace("{}", name) for template in templates]
            features = torch.cat([model.encode_text(model.tokenize([prompt])) for prompt in prompts])
            columns.append(F.normalize(F.normalize(features, dim=1).mean(dim=0), dim=0))
    return torch.stack(columns, dim=1)


def reference_image_features(model: FakeBackbone, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.encode_image(images)


def make_batches(
    images: torch.Tensor, labels: torch.Tensor | None, order: torch.Tensor, batch_size: int, bad: set[int] = frozenset()
) -> list[dict]:
    """Batches as the project's loaders produce them, visiting dataset items in ``order``;
    items in ``bad`` are skipped and reported in the batch's ``bad`` list."""
    batches = []
    for start in range(0, len(order), batch_size):
        visited = order[start : start + batch_size].tolist()
        kept = [index for index in visited if index not in bad]
        batch = {
            "images": images[kept],
            "indices": torch.tensor(kept, dtype=torch.long),
            "bad": [(f"img_{index}.jpg", "truncated JPEG") for index in visited if index in bad],
        }
        if labels is not None:
            batch["labels"] = labels[kept]
        batches.append(batch)
    return batches


# --------------------------------------------------------------------------------------------
# zero-shot classification
# --------------------------------------------------------------------------------------------
def test_classifier_equals_prompt_by_prompt_ensemble_and_runs_without_grad_in_eval_mode() -> None:
    model = FakeBackbone()
    model.train()
    expected = reference_classifier(model, CLASS_NAMES, TEMPLATES)
    model.train()
    model.calls.clear()

    # batch_size 5 splits the 12 prompts across class boundaries
    classifier = build_zeroshot_classifier(model, CLASS_NAMES, TEMPLATES, batch_size=5)

    assert classifier.shape == (16, len(CLASS_NAMES))
    torch.testing.assert_close(classifier, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(len(CLASS_NAMES)))
    assert model.calls == [("text", False, False)] * 3
    assert model.training, "the model's train mode must be restored"
    same = build_zeroshot_classifier(model, CLASS_NAMES, [t.replace("{}", "{c}") for t in TEMPLATES])
    torch.testing.assert_close(same, classifier, atol=1e-6, rtol=0)


def test_templates_without_a_class_placeholder_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"^template 'a satellite photo\.' has no '\{\}' or '\{c\}' placeholder"):
        build_zeroshot_classifier(FakeBackbone(), CLASS_NAMES, ["a photo of {}.", "a satellite photo."])
    with pytest.raises(ValueError, match=r"^template 'a \{classname\}' has placeholder\(s\) \['classname'\]"):
        build_zeroshot_classifier(FakeBackbone(), CLASS_NAMES, ["a {classname}"])


def test_class_prompts_fill_every_placeholder_and_take_class_specific_prompts() -> None:
    prompts = class_prompts(["beach", "forest"], ["a {} next to a {}", "{c} seen from above"])
    assert prompts == [
        ["a beach next to a beach", "beach seen from above"],
        ["a forest next to a forest", "forest seen from above"],
    ]
    cupl = {"beach": ["sand meeting the sea", "a sunny shore"], "forest": ["dense tree canopy"]}
    expected = [["dense tree canopy"], ["sand meeting the sea", "a sunny shore"]]
    assert class_prompts(["forest", "beach"], cupl) == expected
    with pytest.raises(ValueError, match=r"^class-specific templates have no prompts for classes \['meadow'\]$"):
        class_prompts(["beach", "meadow"], cupl)


def zeroshot_case(num_images: int = 53, seed: int = 0, unlabelled: tuple[int, ...] = (4, 17)):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(num_images, 3, 16, 16, generator=generator)
    labels = torch.randint(0, len(CLASS_NAMES), (num_images,), generator=generator)
    labels[list(unlabelled)] = -1
    order = torch.randperm(num_images, generator=generator)
    return images, labels, order


def test_evaluate_zeroshot_matches_sklearn_and_counts_bad_and_unlabelled_items() -> None:
    model = FakeBackbone()
    images, labels, order = zeroshot_case()
    bad = {9, 30, 31}
    batches = make_batches(images, labels, order, batch_size=8, bad=bad)

    metrics = evaluate_zeroshot(model, batches, CLASS_NAMES, TEMPLATES, text_batch_size=7)

    evaluated = [i for i in range(len(images)) if i not in bad and labels[i] >= 0]
    logits = reference_image_features(model, images[evaluated]) @ reference_classifier(model, CLASS_NAMES, TEMPLATES)
    targets, predictions = labels[evaluated].numpy(), logits.argmax(dim=1).numpy()
    assert metrics["acc1"] == pytest.approx(accuracy_score(targets, predictions))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(targets, predictions))
    assert metrics["confusion_matrix"] == confusion_matrix(targets, predictions, labels=range(4)).tolist()
    assert metrics["n_samples"] == len(evaluated) == 48
    assert metrics["n_unlabeled"] == 2
    assert metrics["unlabeled_indices"] == [4, 17]
    assert metrics["n_bad"] == 3
    assert sorted(metrics["bad"]) == [[f"img_{i}.jpg", "truncated JPEG"] for i in (30, 31, 9)]


def test_evaluate_zeroshot_rejects_multilabel_and_out_of_range_labels() -> None:
    model = FakeBackbone()
    images, labels, order = zeroshot_case(num_images=23)
    multi = make_batches(images, torch.zeros(23, 4), order, batch_size=4)
    expected = r"needs integer class labels of shape \(N,\), got torch.float32 of shape \(23, 4\); for multi-label"
    with pytest.raises(ValueError, match=expected):
        evaluate_zeroshot(model, multi, CLASS_NAMES, TEMPLATES)
    labels[6] = 4
    expected = r"^label 4 of dataset index 6 is not a class index in \[0, 4\) or -1 \(no label\)$"
    with pytest.raises(ValueError, match=expected):
        evaluate_zeroshot(model, make_batches(images, labels, order, batch_size=4), CLASS_NAMES, TEMPLATES)
    no_labels = [{"images": images[:2], "indices": torch.tensor([0, 1])}]
    with pytest.raises(ValueError, match=r"^batch 0 has no 'labels' tensor \(keys: \['images', 'indices'\]\)$"):
        evaluate_zeroshot(model, no_labels, CLASS_NAMES, TEMPLATES)


def test_a_loader_whose_items_are_all_bad_is_an_error_not_a_score() -> None:
    images, labels, order = zeroshot_case(num_images=6, unlabelled=())
    batches = make_batches(images, labels, order, batch_size=4, bad=set(range(6)))
    with pytest.raises(ValueError, match=r"^the loader yielded no images to evaluate \(6 items skipped as bad\)$"):
        evaluate_zeroshot(FakeBackbone(), batches, CLASS_NAMES, TEMPLATES)


def test_unknown_dataset_indices_keep_every_image_in_loader_order() -> None:
    images, labels, order = zeroshot_case(num_images=9, unlabelled=())
    batches = make_batches(images, labels, order, batch_size=4)
    for batch in batches:
        batch["indices"] = torch.full_like(batch["indices"], -1)  # webdataset keys that are not numbers
    encoded = encode_loader_images(FakeBackbone(), batches, need_labels=True)
    assert encoded.indices is None
    assert encoded.labels.tolist() == labels[order].tolist()
    torch.testing.assert_close(encoded.features, reference_image_features(FakeBackbone(), images[order]))


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"images": self.images[index], "labels": self.labels[index], "indices": torch.tensor(index)}


def test_evaluate_zeroshot_with_an_accelerator_equals_the_plain_run(fresh_accelerate_state) -> None:
    from accelerate import Accelerator

    images, labels, order = zeroshot_case(num_images=23)
    model = FakeBackbone()
    plain_batches = make_batches(images, labels, torch.arange(23), batch_size=5)
    plain = evaluate_zeroshot(model, plain_batches, CLASS_NAMES, TEMPLATES)

    accelerator = Accelerator()
    loader = torch.utils.data.DataLoader(DictDataset(images, labels), batch_size=5)  # 23 = 4 x 5 + 3
    prepared_model, prepared_loader = accelerator.prepare(model, loader)
    accelerated = evaluate_zeroshot(prepared_model, prepared_loader, CLASS_NAMES, TEMPLATES, accelerator=accelerator)

    assert accelerated["n_samples"] == plain["n_samples"] == 21
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert accelerated[key] == pytest.approx(plain[key], abs=1e-12), key
    assert accelerated["confusion_matrix"] == plain["confusion_matrix"]


class SimulatedTwoProcessAccelerator:
    """Stands in for an ``accelerate.Accelerator`` on 2 processes: ``gather`` appends what the
    other process contributed (recorded from a run over that process's batches)."""

    num_processes = 2

    def __init__(self, rows_per_process: int, other_process: list[torch.Tensor] | None = None) -> None:
        self.rows_per_process = rows_per_process
        self.other_process = other_process
        self.sent: list[torch.Tensor] = []

    def pad_across_processes(self, tensor: torch.Tensor, dim: int = 0, pad_index: int = 0) -> torch.Tensor:
        padding = tensor.new_full((self.rows_per_process - tensor.shape[0], *tensor.shape[1:]), pad_index)
        return torch.cat([tensor, padding])

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sent.append(tensor)
        if self.other_process is None:
            return tensor
        return torch.cat([tensor, self.other_process[len(self.sent) - 1]])

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model


def test_distributed_gathering_drops_repeated_samples_despite_uneven_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels, _ = zeroshot_case(num_images=11, seed=4, unlabelled=())
    model = FakeBackbone()
    # a distributed sampler over 11 items: process 1 repeats item 0 to even out; item 5 cannot be read
    process_0 = make_batches(images, labels, torch.tensor([0, 2, 4, 6, 8, 10]), batch_size=3)
    process_1 = make_batches(images, labels, torch.tensor([1, 3, 5, 7, 9, 0]), batch_size=3, bad={5})
    bad_of_both_processes = [("img_5.jpg", "truncated JPEG")]
    monkeypatch.setattr("accelerate.utils.gather_object", lambda items: list(bad_of_both_processes))

    recorder = SimulatedTwoProcessAccelerator(rows_per_process=6)
    encode_loader_images(model, process_1, recorder, need_labels=True)
    accelerator = SimulatedTwoProcessAccelerator(rows_per_process=6, other_process=recorder.sent)
    distributed = evaluate_zeroshot(model, process_0, CLASS_NAMES, TEMPLATES, accelerator=accelerator)

    single_batches = make_batches(images, labels, torch.arange(11), batch_size=4, bad={5})
    single = evaluate_zeroshot(model, single_batches, CLASS_NAMES, TEMPLATES)
    assert distributed["n_samples"] == single["n_samples"] == 10
    assert distributed["confusion_matrix"] == single["confusion_matrix"]
    assert distributed["acc1"] == single["acc1"]
    assert distributed["n_bad"] == 1 and distributed["bad"] == [["img_5.jpg", "truncated JPEG"]]


# --------------------------------------------------------------------------------------------
# multi-label
# --------------------------------------------------------------------------------------------
LABELS = ["pneumonia", "effusion", "cardiomegaly", "fracture"]


def test_evaluate_multilabel_matches_sklearn_per_label_with_unknowns() -> None:
    generator = torch.Generator().manual_seed(3)
    model = FakeBackbone()
    images = torch.rand(60, 3, 16, 16, generator=generator)
    targets = (torch.rand(60, 4, generator=generator) < 0.4).float()
    targets[torch.rand(60, 4, generator=generator) < 0.2] = float("nan")
    targets[:, 3] = torch.where(torch.isnan(targets[:, 3]), targets[:, 3], torch.ones(60))  # "fracture": no negatives
    pos_templates, neg_templates = ["{}", "signs of {}"], ["no {}", "no signs of {}"]
    bad = {11}
    batches = make_batches(images, targets, torch.randperm(60, generator=generator), batch_size=16, bad=bad)

    metrics = evaluate_multilabel(model, batches, LABELS, pos_templates, neg_templates)

    kept = [i for i in range(60) if i not in bad]
    features = reference_image_features(model, images[kept])
    positive = reference_classifier(model, LABELS, pos_templates)
    negative = reference_classifier(model, LABELS, neg_templates)
    pair_logits = torch.stack([features @ positive, features @ negative], dim=-1) * 100
    probabilities = pair_logits.softmax(dim=-1)[..., 0]
    torch.testing.assert_close(multilabel_probabilities(features, positive, negative), probabilities, atol=1e-6, rtol=0)
    expected = []
    for column, name in enumerate(LABELS[:3]):
        known = ~torch.isnan(targets[kept, column])
        log_odds = pair_logits[..., 0] - pair_logits[..., 1]
        value = roc_auc_score(targets[kept, column][known].numpy(), log_odds[known, column].numpy())
        assert metrics["auroc"][name] == pytest.approx(value, abs=1e-9), name
        expected.append(value)
        assert metrics["label_counts"][name] == {
            "positive": int((targets[kept, column] == 1).sum()),
            "negative": int((targets[kept, column] == 0).sum()),
            "unknown": int((~known).sum()),
        }
    assert metrics["auroc"]["fracture"] is None
    assert metrics["mean_auroc"] == pytest.approx(sum(expected) / 3, abs=1e-9)
    assert metrics["label_counts"]["fracture"]["negative"] == 0
    assert metrics["n_samples"] == 59
    assert metrics["n_bad"] == 1 and metrics["bad"] == [["img_11.jpg", "truncated JPEG"]]


def test_evaluate_multilabel_rejects_targets_that_are_not_0_1_or_nan() -> None:
    images = torch.rand(6, 3, 16, 16)
    targets = torch.zeros(6, 4)
    targets[2, 1] = -1.0  # CheXpert's "uncertain" must be mapped by the loader first
    in_order = torch.arange(6)
    expected = r"^target -1.0 of dataset index 2 for label 'effusion' is not 0, 1 or NaN \(unknown\)$"
    with pytest.raises(ValueError, match=expected):
        evaluate_multilabel(FakeBackbone(), make_batches(images, targets, in_order, 4), LABELS, ["{}"], ["no {}"])
    expected = r"needs targets of shape \(N, 4\) \(one column per label name\), got \(6, 3\)$"
    three_columns = make_batches(images, targets[:, :3], in_order, 4)
    with pytest.raises(ValueError, match=expected):
        evaluate_multilabel(FakeBackbone(), three_columns, LABELS, ["{}"], ["no {}"])


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------
@dataclass
class Record:
    path: str
    captions: list[str]


def test_captions_from_records_flattens_in_record_order() -> None:
    records = [Record("a.jpg", ["x one", "x two"]), Record("b.jpg", []), {"captions": ["z"]}, Record("d.jpg", ["w"])]
    captions, text_to_image = captions_from_records(records)
    assert captions == ["x one", "x two", "z", "w"]
    assert text_to_image.tolist() == [0, 0, 2, 3]
    assert text_to_image.dtype == torch.long


def test_captions_from_records_reports_the_faulty_record() -> None:
    with pytest.raises(ValueError, match=r"^record 1 \(path=b.jpg\) has no 'captions'$"):
        captions_from_records([Record("a.jpg", ["x"]), {"path": "b.jpg"}])
    expected = r"^record 0 \(path=a.jpg\): captions must be a list of strings, got dict; pick one language first$"
    with pytest.raises(ValueError, match=expected):
        captions_from_records([Record("a.jpg", {"en": ["x"], "de": ["y"]})])
    with pytest.raises(ValueError, match=r"^record 0 \(path=a.jpg\): caption 1 is '  ', expected a non-empty string$"):
        captions_from_records([Record("a.jpg", ["x", "  "])])


def test_evaluate_retrieval_matches_metrics_on_reference_features_and_lists_skipped_captions() -> None:
    generator = torch.Generator().manual_seed(5)
    model = FakeBackbone()
    images = torch.rand(30, 3, 16, 16, generator=generator)
    words = ["red", "roof", "river", "green", "field", "road", "ship", "sand", "tree", "car"]
    records = []
    for index in range(30):
        count = index % 4  # 0..3 captions, some images have none
        picks = torch.randint(0, len(words), (count, 3), generator=generator).tolist()
        records.append(Record(f"img_{index}.jpg", [" ".join(words[i] for i in pick) for pick in picks]))
    captions, text_to_image = captions_from_records(records)
    bad = {6}  # image 6 has two captions; the loader cannot read it
    batches = make_batches(images, None, torch.randperm(30, generator=generator), batch_size=8, bad=bad)

    metrics = evaluate_retrieval(model, batches, captions, text_to_image, batch_size=4, ks=(1, 5))

    kept_images = [i for i in range(30) if i not in bad]
    kept_captions = [j for j, owner in enumerate(text_to_image.tolist()) if owner not in bad]
    model.eval()
    with torch.no_grad():
        text_features = torch.cat([model.encode_text(model.tokenize([captions[j]])) for j in kept_captions])
    row_of_image = {image: row for row, image in enumerate(kept_images)}
    expected = retrieval_metrics(
        reference_image_features(model, images[kept_images]),
        text_features,
        torch.tensor([row_of_image[int(text_to_image[j])] for j in kept_captions]),
        ks=(1, 5),
    )
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert metrics["n_images"] == 29
    assert metrics["n_captions"] == len(captions) - 2
    assert metrics["n_captions_skipped"] == 2
    assert metrics["skipped_captions"] == [j for j, owner in enumerate(text_to_image.tolist()) if owner == 6]
    assert metrics["n_bad"] == 1 and metrics["bad"] == [["img_6.jpg", "truncated JPEG"]]


# --------------------------------------------------------------------------------------------
# real data (../shared/data)
# --------------------------------------------------------------------------------------------


RSICD = shared_data_root() / "remote_sensing" / "rsicd"
CHEST_XRAY = shared_data_root() / "medical" / "chest_xray_pneumonia"


def load_image(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB").resize((32, 32), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.mark.shared_data
@pytest.mark.skipif(not (RSICD / "dataset_rsicd.json").is_file(), reason=f"RSICD not found under {RSICD}")
def test_retrieval_on_40_rsicd_test_images_with_their_five_captions() -> None:
    annotations = json.loads((RSICD / "dataset_rsicd.json").read_text())
    test_images = [entry for entry in annotations["images"] if entry["split"] == "test"][:40]
    records = [Record(entry["filename"], [s["raw"] for s in entry["sentences"]]) for entry in test_images]
    images = torch.stack([load_image(RSICD / "RSICD_images" / record.path) for record in records])
    captions, text_to_image = captions_from_records(records)
    assert len(captions) == 200 and torch.bincount(text_to_image).tolist() == [5] * 40

    model = FakeBackbone()
    metrics = evaluate_retrieval(model, make_batches(images, None, torch.arange(40), 16), captions, text_to_image)

    model.eval()
    with torch.no_grad():
        text_features = model.encode_text(model.tokenize(captions))
    expected = retrieval_metrics(reference_image_features(model, images), text_features, text_to_image)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert metrics["n_images_without_captions"] == 0 and metrics["n_bad"] == 0


@pytest.mark.shared_data
@pytest.mark.skipif(not (CHEST_XRAY / "test").is_dir(), reason=f"chest X-ray data not found under {CHEST_XRAY}")
def test_zeroshot_on_40_chest_xrays_matches_sklearn() -> None:
    class_names = ["NORMAL", "PNEUMONIA"]
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted((CHEST_XRAY / "test" / name).glob("*.jpeg"))[:20]
        paths += files
        labels += [label] * len(files)
    assert len(paths) == 40
    images = torch.stack([load_image(path) for path in paths])
    targets = torch.tensor(labels)
    model = FakeBackbone()
    templates = ["a chest x-ray showing {}.", "{} chest radiograph"]

    metrics = evaluate_zeroshot(model, make_batches(images, targets, torch.arange(40), 16), class_names, templates)

    logits = reference_image_features(model, images) @ reference_classifier(model, class_names, templates)
    predictions = logits.argmax(dim=1).numpy()
    assert metrics["acc1"] == pytest.approx(accuracy_score(labels, predictions))
    assert metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert metrics["confusion_matrix"] == confusion_matrix(labels, predictions).tolist()
    assert metrics["acc5"] == 1.0  # top-min(5, 2) of two classes


def test_retrieval_refuses_a_caption_index_past_the_data_set(colour_squares: Path) -> None:
    """A caption naming image 24 of a 24-image data set is a typo, not a caption whose image was skipped."""
    from torch.utils.data import DataLoader

    from domainclip.core.data import Collator, DataSourceConfig, ImageTextDataset, build_image_transform, load_records

    from ..tiny_models import tiny_open_clip

    model = tiny_open_clip(eval_mode=True)
    records = load_records(DataSourceConfig(format="csv", path=str(colour_squares), caption_separator="|"))
    loader = DataLoader(ImageTextDataset(records, build_image_transform(model.preprocess, train=False), train=False),
                        batch_size=8, collate_fn=Collator(None))
    with pytest.raises(ValueError, match=r"text_to_image\[2\] = 24 is past the data set's 24 images \(indices 0 to 23\)"):
        evaluate_retrieval(model, loader, ["a red square", "a green square", "a blue square"], [0, 5, 24])

"""Single-process behaviour of the contrastive losses: parity with open_clip, label-aware masking
against explicit formulas, input errors, the config factory and the single-process gathers."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss as OpenClipLoss
from open_clip.loss import SigLipLoss as OpenSigLipLoss

from domainclip.core.distributed import gather_no_grad, gather_with_grad, world_info
from domainclip.core.losses import ClipLoss, LossConfig, SigLipLoss, build_loss

BATCH, DIM = 8, 16


def _random_inputs(seed: int, batch: int = BATCH, dim: int = DIM) -> dict[str, torch.Tensor]:
    """Normalised float64 features plus scale and bias, all leaves that require grad."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)
    return {
        "image_features": image.requires_grad_(),
        "text_features": text.requires_grad_(),
        "logit_scale": torch.tensor(7.5, dtype=torch.float64, requires_grad=True),
        "logit_bias": torch.tensor(-2.5, dtype=torch.float64, requires_grad=True),
    }


def _loss_and_grads(loss_fn, inputs: dict[str, torch.Tensor], use_bias: bool, **kwargs):
    leaves = {name: value.detach().clone().requires_grad_() for name, value in inputs.items()}
    bias = leaves["logit_bias"] if use_bias else None
    loss = loss_fn(leaves["image_features"], leaves["text_features"], leaves["logit_scale"], bias, **kwargs)
    loss.backward()
    used = [name for name in leaves if use_bias or name != "logit_bias"]
    return loss.detach(), {name: leaves[name].grad for name in used}


def _assert_same_loss_and_grads(ours, reference) -> None:
    torch.testing.assert_close(ours[0], reference[0], atol=1e-6, rtol=0)
    assert ours[1].keys() == reference[1].keys()
    for name in reference[1]:
        torch.testing.assert_close(ours[1][name], reference[1][name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("local_loss", [True, False])
@pytest.mark.parametrize("use_bias", [False, True])
def test_clip_loss_matches_open_clip(local_loss: bool, use_bias: bool) -> None:
    inputs = _random_inputs(seed=0)
    ours = _loss_and_grads(ClipLoss(local_loss=local_loss), inputs, use_bias)
    reference = _loss_and_grads(OpenClipLoss(), inputs, use_bias)
    _assert_same_loss_and_grads(ours, reference)


@pytest.mark.parametrize("use_bias", [False, True])
def test_siglip_loss_matches_open_clip(use_bias: bool) -> None:
    inputs = _random_inputs(seed=1)
    ours = _loss_and_grads(SigLipLoss(), inputs, use_bias)
    reference = _loss_and_grads(OpenSigLipLoss(), inputs, use_bias)
    _assert_same_loss_and_grads(ours, reference)


def test_label_aware_clip_closed_form_on_identity_features() -> None:
    # Images and texts are the 4 unit vectors, so logits are scale on the diagonal and 0 elsewhere.
    # Rows 0 and 1 share class 0: each loses one negative (denominator e^s + 2); row 2 (only
    # member of class 1) and row 3 (unlabelled) keep all three (e^s + 3). Same for text->image.
    scale = 2.0
    features = torch.eye(4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, -1])
    scale_tensor = torch.tensor(scale, dtype=torch.float64)
    loss = ClipLoss(label_aware=True)(features, features, scale_tensor, labels=labels)
    per_row = [math.log(math.exp(scale) + 2) - scale] * 2 + [math.log(math.exp(scale) + 3) - scale] * 2
    assert loss.item() == pytest.approx(sum(per_row) / 4, abs=1e-12)


def _explicit_label_aware_clip(
    similarity: list[list[float]], labels: list[int], scale: float, bias: float
) -> float:
    """Symmetric InfoNCE written out with scalars; same-class labelled off-diagonal pairs skipped."""
    size = len(labels)

    def kept(i: int, j: int) -> bool:
        return i == j or labels[i] < 0 or labels[i] != labels[j]

    def direction(logit) -> float:
        total = 0.0
        for i in range(size):
            denominator = sum(math.exp(logit(i, j)) for j in range(size) if kept(i, j))
            total += math.log(denominator) - logit(i, i)
        return total / size

    image_to_text = direction(lambda i, j: scale * similarity[i][j] + bias)
    text_to_image = direction(lambda i, j: scale * similarity[j][i] + bias)
    return (image_to_text + text_to_image) / 2


def _explicit_label_aware_siglip(
    similarity: list[list[float]], labels: list[int], scale: float, bias: float
) -> float:
    size = len(labels)
    total = 0.0
    for i in range(size):
        for j in range(size):
            if i != j and labels[i] >= 0 and labels[i] == labels[j]:
                continue
            sign = 1.0 if i == j else -1.0
            total += math.log(1.0 + math.exp(-sign * (scale * similarity[i][j] + bias)))
    return total / size


# Pairs (0, 2) share class 3; rows 1 and 3 are both unlabelled and must NOT be treated as a class.
HAND_LABELS = [3, -1, 3, -1]


@pytest.mark.parametrize(
    "loss_fn, explicit",
    [(ClipLoss(label_aware=True), _explicit_label_aware_clip),
     (ClipLoss(local_loss=False, label_aware=True), _explicit_label_aware_clip),
     (SigLipLoss(label_aware=True), _explicit_label_aware_siglip)],
)  # fmt: skip
def test_label_aware_matches_explicit_formula(loss_fn, explicit) -> None:
    inputs = _random_inputs(seed=2, batch=4, dim=5)
    image, text = inputs["image_features"].detach(), inputs["text_features"].detach()
    scale, bias = inputs["logit_scale"].detach(), inputs["logit_bias"].detach()
    loss = loss_fn(image, text, scale, bias, labels=torch.tensor(HAND_LABELS))
    similarity = (image @ text.T).tolist()
    expected = explicit(similarity, HAND_LABELS, scale.item(), bias.item())
    assert loss.item() == pytest.approx(expected, abs=1e-10)
    # The masking must change the value, otherwise this test would not see a missing mask.
    unmasked = explicit(similarity, [-1] * 4, scale.item(), bias.item())
    assert abs(expected - unmasked) > 1e-3


@pytest.mark.parametrize(
    "label_aware_loss, plain_reference",
    [(ClipLoss(label_aware=True), OpenClipLoss()), (SigLipLoss(label_aware=True), OpenSigLipLoss())],
)
@pytest.mark.parametrize("labels", [[-1] * BATCH, list(range(BATCH))], ids=["all_unlabelled", "all_distinct"])
def test_label_aware_without_shared_classes_is_plain_loss(label_aware_loss, plain_reference, labels) -> None:
    inputs = _random_inputs(seed=3)
    ours = _loss_and_grads(label_aware_loss, inputs, use_bias=True, labels=torch.tensor(labels))
    reference = _loss_and_grads(plain_reference, inputs, use_bias=True)
    _assert_same_loss_and_grads(ours, reference)


@pytest.mark.parametrize("loss_fn", [ClipLoss(label_aware=True), SigLipLoss(label_aware=True)])
def test_label_aware_gradients_are_finite(loss_fn) -> None:
    # Masked logits are -inf for ClipLoss; no NaN may leak into the gradients.
    inputs = _random_inputs(seed=4)
    labels = torch.tensor([0, 0, 0, 1, 1, -1, -1, 2])
    _, grads = _loss_and_grads(loss_fn, inputs, use_bias=True, labels=labels)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name


def test_labels_are_ignored_unless_label_aware() -> None:
    inputs = _random_inputs(seed=5)
    shared_class = torch.zeros(BATCH, dtype=torch.long)
    with_labels = _loss_and_grads(ClipLoss(), inputs, use_bias=False, labels=shared_class)
    without_labels = _loss_and_grads(ClipLoss(), inputs, use_bias=False)
    _assert_same_loss_and_grads(with_labels, without_labels)


def _features(batch: int = 4, dim: int = 3) -> torch.Tensor:
    return F.normalize(torch.ones(batch, dim), dim=-1)


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda loss: loss(_features(4), _features(5), 1.0),
         "image_features and text_features must have the same shape (B, D) (row i of each is a "
         "matching pair), got (4, 3) and (5, 3)"),
        (lambda loss: loss(torch.ones(4), _features(4), 1.0),
         "image_features must have shape (B, D), got shape (4,)"),
        (lambda loss: loss(_features(), _features(), torch.ones(2)),
         "logit_scale must be a scalar (one element), got shape (2,)"),
        (lambda loss: loss(_features(), _features(), 1.0, torch.ones(3)),
         "logit_bias must be a scalar (one element), got shape (3,)"),
    ],
)  # fmt: skip
def test_bad_features_raise_clear_errors(loss_cls, call, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{loss_cls.__name__}: {message}")):
        call(loss_cls())


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
@pytest.mark.parametrize(
    "labels, message",
    [
        (None, "label_aware=True needs labels (LongTensor of shape (B,), -1 = unlabelled), got labels=None"),
        (torch.ones(4, 2), "label_aware=True needs integer class labels of shape (B,) (-1 = unlabelled), "
         "got dtype torch.float32 with shape (4, 2); multi-label (B, L) float labels are not supported"),
        (torch.tensor([0, 1, 2]), "labels has 3 entries but the batch has 4 image/text pairs"),
        (torch.tensor([0, -2, 1, -5]), "labels must be >= 0 or -1 (unlabelled), got values [-5, -2]"),
    ],
)  # fmt: skip
def test_bad_labels_raise_clear_errors(loss_cls, labels, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{loss_cls.__name__}: {message}")):
        loss_cls(label_aware=True)(_features(), _features(), 1.0, labels=labels)


def test_empty_batch_raises() -> None:
    expected = "ClipLoss: the global batch is empty (0 image/text pairs)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        ClipLoss()(torch.ones(0, 3), torch.ones(0, 3), 1.0)


def test_build_loss_follows_config() -> None:
    clip = build_loss(LossConfig(name="clip", label_aware=True, local_loss=False))
    assert isinstance(clip, ClipLoss) and clip.label_aware and not clip.local_loss
    siglip = build_loss(LossConfig(name="siglip", label_aware=True))
    assert isinstance(siglip, SigLipLoss) and siglip.label_aware
    default = build_loss(LossConfig())
    assert isinstance(default, ClipLoss) and default.local_loss and not default.label_aware


def test_build_loss_rejects_unknown_name() -> None:
    expected = "unknown loss name 'infonce' in LossConfig.name; valid names: 'clip', 'siglip'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        build_loss(LossConfig(name="infonce"))


def test_single_process_gathers_are_identity() -> None:
    assert world_info() == (0, 1)
    features = torch.randn(3, 2, requires_grad=True)
    gathered, offset = gather_with_grad(features)
    assert gathered is features and offset == 0
    labels = torch.tensor([1, -1, 4])
    gathered_labels, label_offset = gather_no_grad(labels)
    assert torch.equal(gathered_labels, labels) and label_offset == 0
    with pytest.raises(ValueError, match="gather expects a tensor with a batch dimension"):
        gather_with_grad(torch.tensor(1.0))

"""FILIP late interaction: the chunked loss equals a naive per-pair reference (value and gradients),
padding is ignored, and the loss registry builds it from a recipe section."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from domainclip.core.config import ConfigError, from_dict
from domainclip.core.losses import (LOSSES, ClipLoss, FilipLoss, FilipLossConfig, LossConfig, build_loss,
                                    late_interaction_scores, register_loss)

BATCH, IMAGE_TOKENS, TEXT_TOKENS, DIM = 5, 4, 6, 8


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image_tokens = F.normalize(torch.randn(BATCH, IMAGE_TOKENS, DIM, generator=g, dtype=dtype), dim=-1)
    text_tokens = F.normalize(torch.randn(BATCH, TEXT_TOKENS, DIM, generator=g, dtype=dtype), dim=-1)
    text_lengths = torch.tensor([6, 2, 4, 1, 5])
    text_mask = torch.arange(TEXT_TOKENS)[None, :] < text_lengths[:, None]
    image_mask = torch.ones(BATCH, IMAGE_TOKENS, dtype=torch.bool)
    image_mask[2, 3] = False  # one padded image token as well
    return {
        "image_features": F.normalize(torch.randn(BATCH, DIM, generator=g, dtype=dtype), dim=-1),
        "text_features": F.normalize(torch.randn(BATCH, DIM, generator=g, dtype=dtype), dim=-1),
        "logit_scale": torch.tensor(6.0, dtype=dtype),
        "image_tokens": image_tokens, "image_token_mask": image_mask,
        "text_tokens": text_tokens, "text_token_mask": text_mask,
    }


def naive_scores(image_tokens, image_mask, text_tokens, text_mask):
    """Per pair, per token, with Python loops over the real tokens only."""
    n_images, n_texts = image_tokens.shape[0], text_tokens.shape[0]
    image_to_text = torch.zeros(n_images, n_texts, dtype=image_tokens.dtype)
    text_to_image = torch.zeros(n_images, n_texts, dtype=image_tokens.dtype)
    for i in range(n_images):
        patches = image_tokens[i][image_mask[i]]
        for j in range(n_texts):
            words = text_tokens[j][text_mask[j]]
            sims = patches @ words.T  # (real image tokens, real text tokens)
            image_to_text[i, j] = torch.stack([row.max() for row in sims]).mean()
            text_to_image[i, j] = torch.stack([column.max() for column in sims.T]).mean()
    return image_to_text, text_to_image


def naive_filip(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    image_to_text, text_to_image = naive_scores(inputs["image_tokens"], inputs["image_token_mask"],
                                                inputs["text_tokens"], inputs["text_token_mask"])
    targets = torch.arange(BATCH)
    scale = inputs["logit_scale"]
    return (F.cross_entropy(scale * image_to_text, targets) + F.cross_entropy(scale * text_to_image.T, targets)) / 2


def _leaves(inputs):
    return {k: (v.detach().clone().requires_grad_() if v.is_floating_point() else v) for k, v in inputs.items()}


def _grads(leaves):
    return {k: v.grad for k, v in leaves.items() if v.is_floating_point() and v.grad is not None}


@pytest.mark.parametrize("chunk_size", [0, 1, 2, 16])
def test_late_interaction_scores_match_naive(chunk_size: int) -> None:
    x = _inputs()
    expected = naive_scores(x["image_tokens"], x["image_token_mask"], x["text_tokens"], x["text_token_mask"])
    got = late_interaction_scores(x["image_tokens"], x["image_token_mask"], x["text_tokens"], x["text_token_mask"],
                                  chunk_size=chunk_size)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
    only_image = late_interaction_scores(x["image_tokens"], x["image_token_mask"], x["text_tokens"],
                                         x["text_token_mask"], chunk_size, direction="image_to_text")
    assert only_image[1] is None
    torch.testing.assert_close(only_image[0], expected[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [0, 1, 3])
def test_filip_loss_value_and_gradients_match_naive(chunk_size: int) -> None:
    reference = _leaves(_inputs(seed=1))
    expected = naive_filip(reference)
    expected.backward()
    leaves = _leaves(_inputs(seed=1))
    loss_fn = FilipLoss(clip_weight=0.0, chunk_size=chunk_size)
    loss = loss_fn(leaves["image_features"], leaves["text_features"], leaves["logit_scale"], **{
        k: leaves[k] for k in ("image_tokens", "image_token_mask", "text_tokens", "text_token_mask")})
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    for name in ("image_tokens", "text_tokens", "logit_scale"):
        torch.testing.assert_close(leaves[name].grad, reference[name].grad, rtol=0, atol=1e-12)
    assert leaves["image_features"].grad is None  # clip_weight=0: the pooled features take no part


def test_chunked_equals_unchunked_in_float32() -> None:
    values = []
    for chunk_size in (0, 2):
        leaves = _leaves(_inputs(seed=2, dtype=torch.float32))
        loss = FilipLoss(chunk_size=chunk_size)(leaves["image_features"], leaves["text_features"],
                                                leaves["logit_scale"], **{k: leaves[k] for k in (
                                                    "image_tokens", "image_token_mask", "text_tokens",
                                                    "text_token_mask")})
        loss.backward()
        values.append((loss.detach(), _grads(leaves)))
    torch.testing.assert_close(values[0][0], values[1][0], rtol=1e-6, atol=1e-6)
    for name in values[0][1]:
        torch.testing.assert_close(values[0][1][name], values[1][1][name], rtol=1e-5, atol=1e-6)


def test_clip_weight_adds_the_clip_loss() -> None:
    x = _inputs(seed=3)
    tokens = {k: x[k] for k in ("image_tokens", "image_token_mask", "text_tokens", "text_token_mask")}
    combined = FilipLoss(clip_weight=0.5, filip_weight=2.0)(x["image_features"], x["text_features"],
                                                            x["logit_scale"], **tokens)
    expected = 2.0 * naive_filip(x) + 0.5 * ClipLoss()(x["image_features"], x["text_features"], x["logit_scale"])
    torch.testing.assert_close(combined, expected, rtol=0, atol=1e-12)


def test_padding_tokens_change_nothing() -> None:
    x = _inputs(seed=4)
    tokens = {k: x[k] for k in ("image_tokens", "image_token_mask", "text_tokens", "text_token_mask")}
    loss_fn = FilipLoss(clip_weight=0.0)
    before = loss_fn(x["image_features"], x["text_features"], x["logit_scale"], **tokens)
    garbage = dict(tokens)
    garbage["text_tokens"] = torch.where(x["text_token_mask"][..., None], x["text_tokens"], 50.0)
    garbage["image_tokens"] = torch.where(x["image_token_mask"][..., None], x["image_tokens"], -50.0)
    after = loss_fn(x["image_features"], x["text_features"], x["logit_scale"], **garbage)
    torch.testing.assert_close(before, after, rtol=0, atol=1e-12)


def test_label_aware_filip_removes_same_class_negatives() -> None:
    x = _inputs(seed=5)
    labels = torch.tensor([0, 1, 0, -1, 1])
    tokens = {k: x[k] for k in ("image_tokens", "image_token_mask", "text_tokens", "text_token_mask")}
    got = FilipLoss(clip_weight=0.0, label_aware=True)(x["image_features"], x["text_features"], x["logit_scale"],
                                                        labels=labels, **tokens)
    image_to_text, text_to_image = naive_scores(*tokens.values())
    blocked = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0) & ~torch.eye(BATCH, dtype=torch.bool)
    scale, targets = x["logit_scale"], torch.arange(BATCH)
    expected = (F.cross_entropy((scale * image_to_text).masked_fill(blocked, float("-inf")), targets)
                + F.cross_entropy((scale * text_to_image.T).masked_fill(blocked, float("-inf")), targets)) / 2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_filip_loss_errors_are_clear() -> None:
    x = _inputs()
    with pytest.raises(ValueError, match="needs image_tokens"):
        FilipLoss()(x["image_features"], x["text_features"], x["logit_scale"])
    mask = x["text_token_mask"].clone()
    mask[1] = False
    with pytest.raises(ValueError, match=re.escape("text items [1] have no real token")):
        FilipLoss()(x["image_features"], x["text_features"], x["logit_scale"], image_tokens=x["image_tokens"],
                    image_token_mask=x["image_token_mask"], text_tokens=x["text_tokens"], text_token_mask=mask)
    with pytest.raises(ValueError, match="token mask must be boolean"):
        late_interaction_scores(x["image_tokens"], x["image_token_mask"].float(), x["text_tokens"],
                                x["text_token_mask"])


def test_registry_builds_filip_from_a_recipe_section() -> None:
    cfg = from_dict(LossConfig, {"name": "filip", "clip_weight": 0.25, "chunk_size": 4, "label_aware": True})
    assert isinstance(cfg, FilipLossConfig)
    loss = build_loss(cfg)
    assert isinstance(loss, FilipLoss) and loss.needs_tokens
    assert (loss.clip_weight, loss.filip_weight, loss.chunk_size, loss.label_aware) == (0.25, 1.0, 4, True)
    assert type(from_dict(LossConfig, {"name": "siglip"})) is LossConfig
    with pytest.raises(ConfigError, match="unknown key 'chunk'; did you mean 'chunk_size'"):
        from_dict(LossConfig, {"name": "filip", "chunk": 4})
    with pytest.raises(ConfigError, match="unknown key 'chunk_size'"):
        from_dict(LossConfig, {"name": "clip", "chunk_size": 4})  # a clip loss has no chunks
    with pytest.raises(ConfigError, match="did you mean 'filip'"):
        from_dict(LossConfig, {"name": "flip"})
    with pytest.raises(ValueError, match="loss.filip_weight is 0"):
        FilipLossConfig(filip_weight=0.0)


def test_unknown_loss_names_the_closest_and_registration_is_one_line() -> None:
    with pytest.raises(ValueError, match=re.escape("valid names: 'clip', 'siglip', 'filip'; did you mean 'filip'?")):
        build_loss(LossConfig(name="flip"))
    with pytest.raises(ValueError, match="registered twice"):
        register_loss("clip")(lambda cfg: ClipLoss())
    try:
        register_loss("toy_clip")(lambda cfg: ClipLoss(local_loss=False))
        built = build_loss(from_dict(LossConfig, {"name": "toy_clip"}))
        assert isinstance(built, ClipLoss) and not built.local_loss
    finally:
        LOSSES.pop("toy_clip")
        LossConfig.REGISTRY.pop("toy_clip")


# --- in the training loop ----------------------------------------------------------------------
def _filip_recipe(manifest, tmp_path, method: dict) -> dict:
    from ..conftest import tiny_recipe

    data = tiny_recipe(manifest, tmp_path / "runs", max_steps=3)
    data.update(method=method, loss={"name": "filip", "clip_weight": 0.5, "chunk_size": 3},
                eval=[{"name": "squares_retrieval", "task": "retrieval", "batch_size": 8, "rerank": {"name": "filip", "k": 5},
                       "data": {"format": "csv", "path": str(manifest), "caption_separator": "|"}}])
    return data


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "rank": 2, "alpha": 4}])
def test_filip_trains_a_tower_and_retrieval_reports_reranked_recalls(colour_squares, tmp_path, method) -> None:
    from domainclip.core.run_config import RunConfig
    from domainclip.core.train import train

    result = train(from_dict(RunConfig, _filip_recipe(colour_squares, tmp_path, method)))
    record = result.metrics[0]["metrics"]
    assert record["rerank"] == "filip@5"
    for key in ("mean_recall", "reranked_mean_recall", "reranked_image_retrieval_recall@1",
                "reranked_text_retrieval_recall@10"):
        assert 0.0 <= record[key] <= 1.0, key
    import json

    logged = [json.loads(line) for line in (result.run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(row["train/loss"])) for row in logged)


def test_token_loss_with_a_method_that_computes_its_own_loss_is_refused(colour_squares, tmp_path) -> None:
    from domainclip.core.run_config import RunConfig
    from domainclip.core.train import train

    recipe = _filip_recipe(colour_squares, tmp_path, {"name": "coop", "n_ctx": 2})
    recipe["data"]["train"]["templates"] = ["a {} square"]
    with pytest.raises(ValueError, match="loss.name='filip' needs token features, but method 'coop'"):
        train(from_dict(RunConfig, recipe))


def test_default_compute_loss_passes_tokens_only_to_token_losses() -> None:
    from domainclip.core.methods.base import AdaptationMethod, MethodConfig

    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, images, tokens, text_features=None, **kwargs):
            calls.append(kwargs)
            x = _inputs(seed=7, dtype=torch.float32)
            return {"logit_bias": None, **x}

    batch = {"images": None, "tokens": None, "labels": torch.zeros(BATCH, dtype=torch.long)}
    method = AdaptationMethod(MethodConfig())
    clip_value = method.compute_loss(Recorder(), batch, ClipLoss())
    filip_value = method.compute_loss(Recorder(), batch, FilipLoss(clip_weight=0.0))
    assert calls == [{}, {"with_tokens": True}]
    x = _inputs(seed=7, dtype=torch.float32)
    torch.testing.assert_close(clip_value, ClipLoss()(x["image_features"], x["text_features"], x["logit_scale"]))
    torch.testing.assert_close(filip_value, naive_filip(x))

"""The training speed-ups compute exactly what the plain path computes."""
from __future__ import annotations

import sys

import pytest
import torch

from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.backbones.families.open_clip import text_trim
from domainclip.core.train import speed

from ..tiny_models import tiny_open_clip
from domainclip.core.train.optim import build_optimizer
from domainclip.core.run_config import TrainConfig

CAPTIONS = ["a red square", "a small blue square on a white background with a long caption here", "green"]


@pytest.fixture()
def tiny_clip():
    return tiny_open_clip()


def test_trimmed_text_tower_matches_full_context_features_and_gradients(tiny_clip):
    clip = tiny_clip.model
    tokens = tiny_clip.tokenize(CAPTIONS)["input_ids"]
    assert text_trim.text_padding_trim_supported(clip)
    kept = text_trim.pooled_text_length(clip, tokens)
    assert kept == int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]
    assert text_trim.kept_text_length(clip, tokens) == kept  # on a CPU: exactly what is needed

    full = clip.encode_text(tokens)
    full.square().sum().backward()
    full_grads = {n: p.grad.clone() for n, p in clip.named_parameters() if p.grad is not None}
    clip.zero_grad(set_to_none=True)
    trimmed = text_trim.encode_text_trimmed(clip, tokens)
    trimmed.square().sum().backward()
    trimmed_grads = {n: p.grad.clone() for n, p in clip.named_parameters() if p.grad is not None}

    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
    assert set(trimmed_grads) == set(full_grads)
    for name, grad in full_grads.items():
        # float32 rounding differs with the sequence length inside the kernels: compare at its scale
        scale = float(grad.abs().max())
        torch.testing.assert_close(trimmed_grads[name], grad, atol=1e-5 * scale, rtol=1e-4, msg=name)
    # positional rows past the kept length get no gradient in either path
    assert full_grads["positional_embedding"][kept:].abs().max() == 0


def test_trimmed_lengths_come_in_multiples_of_eight():
    """On a GPU (``multiple`` as for CUDA tokens), captions of every length from 1 to 80 words give
    at most ceil(77 / 8) shapes, each a multiple of 8 or the whole context, never shorter than the
    longest caption's end-of-text."""
    backbone = create_backbone(ModelConfig(kind="open_clip", name="ViT-B-32"))
    clip = backbone.model
    lengths = set()
    for words in range(1, 81):
        tokens = backbone.tokenize(["leaf " * words])["input_ids"]
        needed = text_trim.pooled_text_length(clip, tokens)
        kept = text_trim.kept_text_length(clip, tokens, multiple=text_trim.TEXT_LENGTH_MULTIPLE)
        assert kept >= needed and (kept % 8 == 0 or kept == tokens.shape[1])
        lengths.add(kept)
    assert lengths == {8, 16, 24, 32, 40, 48, 56, 64, 72, 77}


def test_backbone_text_features_use_the_trimmed_path(tiny_clip):
    tokens = tiny_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        ours = tiny_clip.encode_text(tokens)
        reference = torch.nn.functional.normalize(tiny_clip.model.encode_text(tokens["input_ids"]), dim=-1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_trim_is_refused_without_a_causal_mask(tiny_clip):
    clip = tiny_clip.model
    clip.attn_mask = torch.zeros_like(clip.attn_mask)  # bidirectional: padding would matter
    assert not text_trim.text_padding_trim_supported(clip)
    tokens = tiny_clip.tokenize(CAPTIONS)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(text_trim.encode_text_trimmed(clip, tokens), clip.encode_text(tokens))


def test_fused_adamw_is_used_on_cpu_and_steps_like_the_reference():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 4))
    reference_weight = torch.nn.Parameter(weight.detach().clone())
    assert speed.adamw_kwargs([{"params": [weight]}]) == {"fused": True}
    assert speed.adamw_kwargs([torch.zeros(2, dtype=torch.int64)]) == {}
    assert speed.adamw_kwargs([]) == {}
    cfg = TrainConfig(lr=1e-2)
    ours = build_optimizer([{"params": [weight], "lr": cfg.lr, "weight_decay": 0.1}], cfg)
    assert ours.defaults["fused"] is True
    reference = torch.optim.AdamW([reference_weight], lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=0.1)
    for step in range(3):
        grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        weight.grad, reference_weight.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    torch.testing.assert_close(weight, reference_weight, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is glibc-only")
def test_cpu_allocator_tuning_applies_on_glibc():
    assert speed.tune_cpu_allocator() is True


def test_trim_support_is_kept_per_model_until_its_mask_changes(tiny_clip):
    clip = tiny_clip.model
    assert text_trim.text_padding_trim_supported(clip)
    assert text_trim._TRIM_SUPPORT[clip][1] is True
    with torch.no_grad():
        clip.attn_mask.zero_()  # changed in place: the kept answer must not be reused
    assert not text_trim.text_padding_trim_supported(clip)
    other = tiny_open_clip().model
    assert text_trim.text_padding_trim_supported(other)  # one model's answer is not another's

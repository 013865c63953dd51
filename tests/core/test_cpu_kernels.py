"""The CPU training kernels (core/train/cpu_kernels.py) compute what the default kernels compute,
and are chosen exactly where intended: short differentiable attention, patchifying convolutions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from domainclip.core.train.cpu_kernels import (SHORT_ATTENTION_MAX_TOKENS, CpuTrainingKernels, attention_tokens,
                                               patch_embedding, patchify_arguments, short_attention)

from tests.conftest import tiny_recipe

from domainclip.core import config as config_lib
from domainclip.core.run_config import RunConfig
from domainclip.core.train.loop import train

from ..tiny_models import save_tiny_hf, tiny_dual, tiny_open_clip

FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def ops_run(step) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {event.key for event in prof.key_averages()}


@pytest.mark.parametrize("size,bias", [((2, 3, 32, 32), True), ((1, 4, 45, 38), False)])
def test_patch_embedding_equals_the_convolution_values_and_gradients(size, bias) -> None:
    torch.manual_seed(0)
    x = torch.randn(*size, requires_grad=True)
    conv = torch.nn.Conv2d(size[1], 6, 8, stride=8, bias=bias)
    expected = conv(x)
    expected.square().sum().backward()
    grads = [t.grad.clone() for t in (x, conv.weight, *([conv.bias] if bias else []))]
    for t in (x, conv.weight, conv.bias):
        if t is not None:
            t.grad = None
    got = patch_embedding(x, conv.weight, conv.bias)
    got.square().sum().backward()
    assert got.shape == expected.shape == (size[0], 6, size[2] // 8, size[3] // 8)  # partial patches left out
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for ours, reference in zip((x.grad, conv.weight.grad, *([conv.bias.grad] if bias else [])), grads):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert float(x.grad[:, :, 40:].abs().max() if size[2] > 40 else 0) == 0  # pixels past the last patch


def test_only_patchifying_convolutions_are_rewritten() -> None:
    x, w = torch.randn(1, 3, 32, 32), torch.randn(4, 3, 8, 8)
    assert patchify_arguments((x, w, None, 8), {}) is not None
    assert patchify_arguments((x, w), {"stride": (8, 8), "padding": "valid"}) is not None
    assert patchify_arguments((x, w, None, 4), {}) is None  # overlapping windows
    assert patchify_arguments((x, w, None, 8, 1), {}) is None  # padded
    assert patchify_arguments((x, w, None, 8, 0, 2), {}) is None  # dilated
    assert patchify_arguments((x, torch.randn(4, 3, 4, 4), None, 4), {}) is None  # smaller than MIN_PATCH: oneDNN's
    assert patchify_arguments((x, torch.randn(4, 1, 8, 8), None, 8, 0, 1, 3), {}) is None  # grouped
    assert patchify_arguments((x[0], w, None, 8), {}) is None  # unbatched


def _attention_errors(attention, mask_kind: str, dtype: torch.dtype) -> list[float]:
    """Largest error of the output and of each input's gradient against float64 sdpa, relative to
    the reference's largest value (queries 7, keys 11: not square)."""
    torch.manual_seed(0)
    inputs = [torch.randn(2, 3, length, 16, dtype=torch.float64) for length in (7, 11, 11)]
    mask, causal = None, mask_kind == "causal"
    if mask_kind == "bool":
        mask = torch.rand(7, 11) > 0.3
        mask[2] = False  # one query sees no key: its output and gradients are zero
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 7, 11)
    grad_out = torch.randn(2, 3, 7, 16, dtype=torch.float64)

    def run(fn, tensors, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in tensors]
        out = fn(*leaves, attn_mask=mask, is_causal=causal)
        out.backward(grad_out.to(out.dtype))
        return [out.detach().double(), *(leaf.grad.double() for leaf in leaves)]

    reference = run(F.scaled_dot_product_attention, inputs, torch.float64)
    if mask_kind == "bool":
        reference = [r.nan_to_num(0.0) for r in reference]
        reference[0][:, :, 2] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        ours = run(attention, inputs, torch.float32)
    assert ours[0].dtype == torch.float64 and ours[0].shape == reference[0].shape
    return [float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, reference)]


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "float"])
def test_short_attention_matches_float64_as_closely_as_flash(mask_kind: str) -> None:
    assert max(_attention_errors(short_attention, mask_kind, torch.float32)) < 1e-5
    ours = _attention_errors(short_attention, mask_kind, torch.bfloat16)
    if mask_kind != "bool":  # flash has no answer for a query that sees no key
        flash = _attention_errors(F.scaled_dot_product_attention, mask_kind, torch.bfloat16)
        assert all(o <= 1.5 * f + 1e-3 for o, f in zip(ours, flash)), (ours, flash)
    assert max(ours) < 2e-2, ours  # bf16 inputs and output (8 bits of mantissa)


def test_short_attention_leaves_calls_it_does_not_cover() -> None:
    q = torch.randn(2, 4, 5, 8)
    assert short_attention(q, q, q, dropout_p=0.1) is None
    assert short_attention(q, q[:, :2], q[:, :2], enable_gqa=True) is None
    assert short_attention(q, q[:1], q[:1]) is None  # broadcast batch dimensions
    assert short_attention(q, q, q, attn_mask=torch.zeros(5, 5, requires_grad=True)) is None


@pytest.mark.parametrize("mask_dims", [0, 2, 3])
def test_multi_head_self_attention_equals_torchs(mask_dims: int) -> None:
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(16, 4)
    x = torch.randn(6, 3, 16, requires_grad=True)  # (L, N, E)
    mask = {0: None, 2: torch.randn(6, 6), 3: torch.randn(3 * 4, 6, 6)}[mask_dims]

    def step(route: bool) -> list[torch.Tensor]:
        attention.zero_grad(set_to_none=True)
        x.grad = None
        with CpuTrainingKernels() if route else torch.enable_grad():
            out, weights = attention(x, x, x, need_weights=False, attn_mask=mask)
        assert weights is None
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        return [out.detach(), x.grad, attention.in_proj_weight.grad, attention.out_proj.weight.grad]

    expected = step(route=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = step(route=True)
    assert "ShortAttentionBackward" in {event.key for event in prof.key_averages()}
    for ours, reference in zip(got, expected):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_other_multi_head_attention_calls_keep_torchs_code() -> None:
    attention = torch.nn.MultiheadAttention(8, 2)
    x, y = torch.randn(5, 2, 8, requires_grad=True), torch.randn(4, 2, 8)
    padding = torch.zeros(2, 4, dtype=torch.bool)
    with CpuTrainingKernels():
        for call in (lambda: attention(x, x, x, need_weights=True),  # weights asked for
                     lambda: attention(x, y, y, need_weights=False),  # keys from elsewhere
                     lambda: attention(y, y, y, need_weights=False, key_padding_mask=padding)):
            used = ops_run(lambda: call()[0].sum().backward())
            assert "ShortAttentionBackward" not in used


def test_attention_length_is_read_from_both_call_forms() -> None:
    q, k = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 17, 4)
    assert attention_tokens(F.scaled_dot_product_attention, (q, k, k), {}) == 17
    assert attention_tokens(F.multi_head_attention_forward, (torch.randn(9, 2, 8), torch.randn(12, 2, 8)), {}) == 12


def _train_step(model, images, tokens, kernels: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with CpuTrainingKernels() if kernels else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = model(images, tokens)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        loss = F.cross_entropy(logits, torch.arange(len(images)))
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(model, images, tokens) -> None:
    loss, grads = _train_step(model, images, tokens, kernels=False)
    loss_k, grads_k = _train_step(model, images, tokens, kernels=True)
    torch.testing.assert_close(loss_k, loss, atol=1e-5, rtol=1e-5)
    assert grads_k.keys() == grads.keys() and grads
    largest = max(float(grad.abs().max()) for grad in grads.values())
    for name, grad in grads.items():
        # a key projection's bias has no true gradient (softmax ignores it): there both are rounding noise
        atol = 1e-5 * float(grad.abs().max()) + 1e-7 * largest
        torch.testing.assert_close(grads_k[name], grad, atol=atol, rtol=1e-4, msg=name)


def test_a_training_step_is_the_same_with_the_kernels_and_uses_them() -> None:
    model = tiny_open_clip().train()
    images = torch.randn(4, 3, 32, 32)
    tokens = model.tokenize(["a red square", "blue", "a green leaf with spots", "grey"])
    _assert_same_step(model, images, tokens)
    plain = ops_run(lambda: _train_step(model, images, tokens, kernels=False))
    routed = ops_run(lambda: _train_step(model, images, tokens, kernels=True))
    assert FLASH in plain and "aten::convolution" in plain
    assert FLASH not in routed and "aten::convolution" not in routed
    assert "ShortAttentionBackward" in routed  # nn.MultiheadAttention's attention, through the functional form


def test_inference_and_long_sequences_keep_the_default_kernels() -> None:
    model = tiny_open_clip(eval_mode=True)
    images = torch.randn(2, 3, 32, 32)
    with CpuTrainingKernels(), torch.no_grad():
        used = ops_run(lambda: model.encode_image(images))
    assert FLASH in used and "aten::convolution" in used  # nothing needs gradients: forward-only kernels stay
    long = [torch.randn(1, 2, SHORT_ATTENTION_MAX_TOKENS + 1, 8, requires_grad=True) for _ in range(3)]
    short = [t[:, :, :SHORT_ATTENTION_MAX_TOKENS].detach().requires_grad_() for t in long]
    with CpuTrainingKernels():
        assert FLASH in ops_run(lambda: F.scaled_dot_product_attention(*long).sum().backward())
        assert FLASH not in ops_run(lambda: F.scaled_dot_product_attention(*short).sum().backward())


@pytest.mark.parametrize("setting,logged", [
    ({}, "CPU kernels: short attention with gradients, patch embeddings as matrix products"),
    ({"grad_checkpointing": True}, "CPU kernels: torch's defaults (train.grad_checkpointing)"),
    ({"cpu_kernels": False}, "CPU kernels: torch's defaults (train.cpu_kernels=false)")])
def test_cpu_training_uses_the_kernels_unless_checkpointing_or_switched_off(colour_squares: Path, tmp_path: Path,
                                                                           setting: dict, logged: str) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2, **setting)
    result = train(config_lib.load(RunConfig, None, (), base=recipe))
    assert logged in (result.run_dir / "logs" / "train.log").read_text()
    assert result.global_step == 2


def test_the_kernels_change_no_training_result_beyond_rounding(colour_squares: Path, tmp_path: Path) -> None:
    runs = {}
    for kernels in (True, False):
        recipe = tiny_recipe(colour_squares, tmp_path / f"runs_{kernels}", max_steps=4, cpu_kernels=kernels)
        run_dir = train(config_lib.load(RunConfig, None, (), base=recipe)).run_dir
        runs[kernels] = [json.loads(line)["train/loss"]
                         for line in (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]
    assert len(runs[True]) == 4
    for routed, default in zip(runs[True], runs[False]):
        assert abs(routed - default) <= 1e-4 * abs(default), runs


def test_hugging_face_and_timm_towers_get_the_same_step(tmp_path: Path) -> None:
    from domainclip.core.backbones import ModelConfig, create_backbone

    torch.manual_seed(0)
    hf = create_backbone(ModelConfig(kind="hf", name=str(save_tiny_hf(tmp_path / "clip", "clip"))))
    # eval mode: MiniLM's dropout would draw different masks in two passes; gradients are still taken
    for model in (hf.eval(), tiny_dual().eval()):
        images = torch.randn(3, 3, 32, 32)
        tokens = model.tokenize(["a red square", "blue", "a green leaf"])
        _assert_same_step(model, images, tokens)
        assert FLASH not in ops_run(lambda: _train_step(model, images, tokens, kernels=True))

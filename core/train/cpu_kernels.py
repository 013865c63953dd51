"""Faster CPU kernels for two operations of a training step, chosen per call; same mathematics.

Profiling a ViT-B/32 training step on a 2-core CPU (bf16 autocast, batch 32; docs/benchmarks.md)
found two operations taking a third of the step while doing a few percent of its FLOPs:

* **attention's backward.** torch's CPU flash-attention kernel, which ``scaled_dot_product_attention``
  picks by default, computes the backward of short sequences slowly: 47 ms for 32 x 12 heads x 50
  tokens forward and backward in bf16, against 20 ms for torch's *math* backend (the same
  softmax(QK^T / sqrt(d)) V as matrix products, differentiated by autograd) with the same accuracy
  against a float64 reference. The math backend computes in float32 and keeps its float32 copies of
  the queries, keys, values and probabilities for the backward pass (400 MiB more per ViT-B/32 step
  than flash), so :class:`ShortAttention` does its arithmetic (float32 scores, softmax and
  products) but keeps only the inputs, and recomputes the probabilities in the backward pass:
  math's speed at flash's memory. Flash is faster for long sequences (197 tokens: 63 against
  83 ms for math) and for forward-only passes, so this applies only to attention over at most
  :data:`SHORT_ATTENTION_MAX_TOKENS` positions whose result needs gradients.
* **the patch embedding's backward.** A ViT's first layer is a convolution whose stride equals its
  kernel (32 x 32 patches): non-overlapping patches times one matrix. oneDNN's convolution
  backward took 287 ms for ViT-B/32's at batch 32 in bf16; the same product written as a reshape
  and one matrix multiplication takes 18 ms forward and backward, with the same error against float64.

:class:`CpuTrainingKernels` is a ``TorchFunctionMode``: while it is active, each call of
``scaled_dot_product_attention`` / ``multi_head_attention_forward`` (``nn.MultiheadAttention``) and
each patchifying ``conv2d`` is routed as above, whatever module makes it (open_clip, Hugging Face,
timm towers alike); everything else runs unchanged. Weights, state dicts and checkpoints are
untouched. The training loop keeps it active over the forward and backward pass of CPU training
steps, except with activation checkpointing (``train.grad_checkpointing``): torch recomputes the
checkpointed forward in the backward pass without the mode, so the recomputed graph would not
match the saved one. Results differ from the default kernels only by floating-point rounding
(tests/core/test_cpu_kernels.py).
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

# at 97 tokens math took 53 ms against flash's 100, at 128 83 against 90, at 145 107 against 122,
# at 197 83 against 63 (bf16, forward + backward, 12 heads of 64; 2-core Xeon with AMX)
SHORT_ATTENTION_MAX_TOKENS = 128
# patch embeddings (ViT patches of 14, 16, 32 pixels); smaller strided convolutions are left to oneDNN
MIN_PATCH = 8


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value


def _needs_grad(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(args, kwargs))


def attention_tokens(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The longer of the query and key sequence lengths of an attention call."""
    query = args[0] if args else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs.get("key", query)
    if func is F.multi_head_attention_forward:  # (L, N, E) or unbatched (L, E): sequence first
        return max(query.shape[0], key.shape[0])
    return max(query.shape[-2], key.shape[-2])  # scaled_dot_product_attention: (..., L, E)


def _probabilities(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(Q K^T * scale + bias) in float32; rows with every key masked give zeros."""
    scores = torch.matmul(query.float(), key.float().transpose(-2, -1)).mul_(scale)
    if bias is not None:
        scores = scores + bias
    probabilities = torch.softmax(scores, dim=-1)
    if bias is not None:  # a fully masked row is NaN after the softmax: nothing attended, zero out
        probabilities = probabilities.nan_to_num_(0.0)
    return probabilities


class ShortAttention(torch.autograd.Function):
    """softmax(Q K^T * scale + bias) V in float32, output in the inputs' dtype; saves only Q, K, V
    (and the bias) and recomputes the probabilities for the backward pass."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                scale: float) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            out = torch.matmul(_probabilities(query, key, bias, scale), value.float()).to(query.dtype)
        ctx.save_for_backward(query, key, value, bias)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, bias = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            probabilities = _probabilities(query, key, bias, ctx.scale)
            grad = grad_out.float()
            grad_value = torch.matmul(probabilities.transpose(-2, -1), grad)
            grad_probabilities = torch.matmul(grad, value.float().transpose(-2, -1))
            grad_scores = probabilities * (grad_probabilities - (grad_probabilities * probabilities).sum(-1, keepdim=True))
            grad_query = torch.matmul(grad_scores, key.float()).mul_(ctx.scale)
            grad_key = torch.matmul(grad_scores.transpose(-2, -1), query.float()).mul_(ctx.scale)
        return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype), None, None


def short_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                    enable_gqa: bool = False) -> torch.Tensor | None:
    """``scaled_dot_product_attention`` through :class:`ShortAttention`; None for a call it does not
    cover (dropout, grouped-query heads, broadcast batch dimensions, a mask that takes gradients)."""
    if (dropout_p > 0.0 or enable_gqa or query.dim() < 2 or not query.shape[:-2] == key.shape[:-2] == value.shape[:-2]
            or (attn_mask is not None and (attn_mask.requires_grad or is_causal))):
        return None
    if torch.is_autocast_enabled("cpu"):  # autocast runs this op in its lower precision
        dtype = torch.get_autocast_dtype("cpu")
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if not query.dtype == key.dtype == value.dtype:
        return None
    bias = None
    if is_causal:
        bias = torch.full((query.shape[-2], key.shape[-2]), float("-inf")).triu_(1)  # top-left aligned, as sdpa's
    elif attn_mask is not None:
        bias = (torch.zeros(attn_mask.shape).masked_fill_(attn_mask.logical_not(), float("-inf"))
                if attn_mask.dtype == torch.bool else attn_mask.float())
    return ShortAttention.apply(query, key, value, bias, query.shape[-1] ** -0.5 if scale is None else scale)


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def multi_head_self_attention(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, None] | None:
    """``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` calls) for the plain
    self-attention case, with :func:`short_attention` inside; None for any other case.

    The same steps as torch's function: packed input projection, heads split, attention, output
    projection. The plain case: one tensor as query, key and value, batched, packed projection
    weights, no added key/value biases or zero attention, no padding mask, no attention weights
    returned, no dropout, no causal flag, a float mask or none.
    """
    call = _MHA_SIGNATURE.bind(*args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    query, mask = a["query"], a["attn_mask"]
    plain = (query is a["key"] is a["value"] and query.dim() == 3 and a["in_proj_weight"] is not None
             and a["bias_k"] is None and a["bias_v"] is None and not a["add_zero_attn"]
             and a["key_padding_mask"] is None and not a["need_weights"] and not a["use_separate_proj_weight"]
             and a["static_k"] is None and a["static_v"] is None and not a["is_causal"]
             and (a["dropout_p"] == 0.0 or not a["training"])
             and (mask is None or (mask.is_floating_point() and not mask.requires_grad and mask.dim() in (2, 3))))
    if not plain:
        return None
    length, batch, embed = query.shape
    heads = a["num_heads"]
    projected = F.linear(query, a["in_proj_weight"], a["in_proj_bias"])
    projected = projected.unflatten(-1, (3, embed)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    q, k, v = (t.view(length, batch * heads, embed // heads).transpose(0, 1).view(batch, heads, length, -1)
               for t in projected)
    if mask is not None:
        mask = mask.view(1, 1, length, length) if mask.dim() == 2 else mask.view(batch, heads, length, length)
    out = short_attention(q, k, v, mask)
    if out is None:
        return None
    out = F.linear(out.permute(2, 0, 1, 3).reshape(batch * length, embed), a["out_proj_weight"], a["out_proj_bias"])
    return out.view(length, batch, out.size(1)), None


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def patchify_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor | None] | None:
    """``(input, weight, bias)`` when a ``conv2d`` call cuts its input into non-overlapping patches
    of at least :data:`MIN_PATCH` pixels (stride = kernel, no padding, dilation 1, one group), else None."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    call = dict(zip(names, args))
    call.update(kwargs)
    x, weight = call.get("input"), call.get("weight")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or weight.dim() != 4:
        return None
    kernel = tuple(weight.shape[-2:])
    padding = call.get("padding", 0)
    if (_pair(call.get("stride", 1)) != kernel or min(kernel) < MIN_PATCH or call.get("groups", 1) != 1
            or _pair(call.get("dilation", 1)) != (1, 1) or not (padding == "valid" or _pair(padding) == (0, 0))):
        return None
    return x, weight, call.get("bias")


def patch_embedding(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride=kernel)`` as one matrix product over the image's patches.

    Pixels past the last whole patch are left out, as the convolution leaves them out. The result
    has the convolution's shape (N, C_out, H // kh, W // kw), as a view of an (N, patches, C_out)
    tensor, which is the layout a ViT reshapes it into next.
    """
    batch, channels, height, width = x.shape
    kh, kw = weight.shape[-2:]
    rows, cols = height // kh, width // kw
    x = x[:, :, :rows * kh, :cols * kw]
    patches = x.reshape(batch, channels, rows, kh, cols, kw).permute(0, 2, 4, 1, 3, 5)
    out = F.linear(patches.reshape(batch, rows * cols, channels * kh * kw), weight.reshape(weight.shape[0], -1), bias)
    return out.transpose(1, 2).reshape(batch, weight.shape[0], rows, cols)


class CpuTrainingKernels(TorchFunctionMode):
    """Route short differentiable attention to :class:`ShortAttention` (torch's math backend where it
    does not apply) and patch embeddings to a matrix product while active (see the module
    docstring). Enter it around forward and backward."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention or func is F.multi_head_attention_forward:
            if _needs_grad(args, kwargs) and attention_tokens(func, args, kwargs) <= SHORT_ATTENTION_MAX_TOKENS:
                out = (short_attention(*args, **kwargs) if func is F.scaled_dot_product_attention
                       else multi_head_self_attention(args, kwargs))
                if out is not None:
                    return out
                with sdpa_kernel([SDPBackend.MATH]):  # what ShortAttention does not cover
                    return func(*args, **kwargs)
        elif func is torch.conv2d and _needs_grad(args, kwargs):
            patchify = patchify_arguments(args, kwargs)
            if patchify is not None:
                return patch_embedding(*patchify)
        return func(*args, **kwargs)


def cpu_training_kernels(enabled: bool) -> contextlib.AbstractContextManager:
    """A fresh :class:`CpuTrainingKernels` when ``enabled``, else a context that does nothing."""
    return CpuTrainingKernels() if enabled else contextlib.nullcontext()

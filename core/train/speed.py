"""Training speed-ups that leave the mathematics unchanged.

Each function here makes training faster without changing the model, the batch, the precision
or the loss; results differ from the plain path at most by floating-point rounding (a different
summation order inside a kernel), never by what is computed.

* :func:`tune_cpu_allocator` -- on CPU, every step allocates and frees gigabytes of activations
  and gradients. glibc's malloc returns freed memory at the top of its heap to the kernel and
  the next step faults it back in page by page (hundreds of thousands of page faults per step
  for ViT-B-32, half a second of kernel time on two cores). Keeping freed memory in the
  process removes that; the peak footprint is unchanged (the same memory is reused).
* :func:`adamw_kwargs` -- torch's fused AdamW updates every parameter in one kernel instead of
  a dozen element-wise passes per tensor (about 8x faster on CPU for a 150M-parameter model).
* :func:`encode_text_trimmed` -- an open_clip CLIP text tower with a causal attention mask and
  end-of-text pooling computes the pooled feature from the tokens up to the end-of-text token
  only; positions after it (padding up to the 77-token context) can neither influence it nor
  receive gradient. Running the tower on the batch's longest caption instead of the full context
  gives the same features and gradients at a fraction of the cost for short captions. Hugging
  Face tokenizers already pad to the longest caption, so this brings open_clip towers to par.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("domainclip.train")

# mallopt(3) parameter numbers (glibc <malloc.h>).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_KEEP_FREED_BYTES = 2**31 - 1  # trim threshold: in effect "never give freed heap memory back"
_TOP_PAD_BYTES = 64 * 1024 * 1024


def tune_cpu_allocator() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the kernel.

    Sets the trim threshold out of reach, grows the heap in 64 MiB steps and serves blocks up to
    32 MiB from the heap (larger ones stay mmap-backed). Affects only allocations made after the
    call, in this process and processes forked from it (data-loader workers). Returns False (and
    does nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, _MAX_MMAP_THRESHOLD), (_M_TOP_PAD, _TOP_PAD_BYTES),
                (_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))
    applied = all(mallopt(option, value) == 1 for option, value in settings)
    if not applied:
        log.warning("tune_cpu_allocator: mallopt refused a setting; CPU training keeps the default allocator")
    return applied


def adamw_kwargs(params: Iterable[Any]) -> dict[str, Any]:
    """``{"fused": True}`` when torch has a fused AdamW kernel for every trainable parameter.

    ``params`` are tensors or param-group dicts (``{"params": [...], ...}``) as passed to the
    optimizer. Falls back to ``{}`` (torch's default implementation) for parameters on a device or
    of a dtype the fused kernel does not support, so the caller never has to special-case.
    """
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    supported = set(_get_fused_kernels_supported_devices())
    tensors: list[torch.Tensor] = []
    for item in params:
        tensors.extend(item["params"] if isinstance(item, dict) else [item])
    if not tensors:
        return {}
    fusable = all(t.device.type in supported and t.is_floating_point() and not t.is_sparse for t in tensors)
    return {"fused": True} if fusable else {}


def text_padding_trim_supported(clip_model: torch.nn.Module) -> bool:
    """Whether :func:`encode_text_trimmed` may drop padding for this open_clip model.

    True for an open_clip ``CLIP`` (not a subclass overriding ``encode_text``) whose text tower
    uses a causal mask and ``argmax`` (end-of-text = highest token id) or ``eos`` pooling: then
    each pooled feature depends only on tokens up to its end-of-text position.
    """
    try:
        from open_clip.model import CLIP
    except ImportError:
        return False
    if not isinstance(clip_model, CLIP) or type(clip_model).encode_text is not CLIP.encode_text:
        return False
    if clip_model.text_pool_type not in ("argmax", "eos"):
        return False
    if clip_model.text_pool_type == "eos" and getattr(clip_model, "text_eos_id", None) is None:
        return False
    return _is_causal_mask(getattr(clip_model, "attn_mask", None), clip_model.positional_embedding.shape[0])


def _is_causal_mask(mask: torch.Tensor | None, length: int) -> bool:
    """An additive (length, length) mask that is 0 on and below the diagonal and -inf above it."""
    if mask is None or mask.shape != (length, length):
        return False
    above = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.isneginf(mask[above]).all()) and bool((mask[~above] == 0).all())


def pooled_text_length(clip_model: torch.nn.Module, text: torch.Tensor) -> int:
    """Leading token positions the pooled features of this batch depend on (max pooled index + 1)."""
    if clip_model.text_pool_type == "eos":
        positions = (text == clip_model.text_eos_id).int().argmax(dim=-1)
    else:
        positions = text.argmax(dim=-1)
    return int(positions.max()) + 1


def encode_text_trimmed(clip_model: torch.nn.Module, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``clip_model.encode_text(text)`` computed on the first ``pooled_text_length`` tokens only.

    Same modules, same operations and same pooled positions as open_clip's ``CLIP.encode_text``
    (token embedding, positional embedding, causal transformer, final norm, pooling,
    projection), with the positional embedding and causal mask cut to the kept length. Falls
    back to the model's own ``encode_text`` when trimming is not exact for it
    (:func:`text_padding_trim_supported`) or would keep every position.
    """
    if text.dim() != 2 or not text_padding_trim_supported(clip_model):
        return clip_model.encode_text(text, normalize=normalize)
    length = pooled_text_length(clip_model, text)
    if length >= text.shape[1]:
        return clip_model.encode_text(text, normalize=normalize)
    from open_clip.transformer import text_global_pool

    text = text[:, :length]
    cast_dtype = clip_model.transformer.get_cast_dtype()
    x = clip_model.token_embedding(text).to(cast_dtype)
    x = x + clip_model.positional_embedding[:length].to(cast_dtype)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask[:length, :length])
    x = clip_model.ln_final(x)
    x = text_global_pool(x, text, clip_model.text_pool_type, eos_token_id=getattr(clip_model, "text_eos_id", None))
    projection = clip_model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return F.normalize(x, dim=-1) if normalize else x

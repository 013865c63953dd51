"""The open_clip text tower on the batch's longest caption instead of its whole context.

An open_clip CLIP text tower with a causal attention mask and end-of-text pooling computes the
pooled feature from the tokens up to the end-of-text token only; positions after it (padding up to
the 77-token context) can neither influence it nor receive gradient. Running the tower on the
batch's longest caption instead of the full context gives the same features and gradients at a
fraction of the cost for short captions (Hugging Face tokenizers already pad to the longest
caption, so this brings open_clip towers to par).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool


_TRIM_SUPPORT: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, bool]]" = weakref.WeakKeyDictionary()


def text_padding_trim_supported(clip_model: torch.nn.Module) -> bool:
    """Whether :func:`encode_text_trimmed` may drop padding for this open_clip model.

    True for an open_clip ``CLIP`` (not a subclass overriding ``encode_text``) whose text tower
    uses a causal mask and ``argmax`` (end-of-text = highest token id) or ``eos`` pooling: then
    each pooled feature depends only on tokens up to its end-of-text position.

    The answer is kept per model until its mask or pooling changes: checking the mask reads it
    back from the device, which would make every training step wait for the GPU.
    """
    mask = getattr(clip_model, "attn_mask", None)
    key = (getattr(clip_model, "text_pool_type", None), getattr(clip_model, "text_eos_id", None),
           None if mask is None else (mask.data_ptr(), mask._version, mask.shape, mask.device))
    known = _TRIM_SUPPORT.get(clip_model)
    if known is not None and known[0] == key:
        return known[1]
    supported = _trim_supported(clip_model)
    _TRIM_SUPPORT[clip_model] = (key, supported)
    return supported


def _trim_supported(clip_model: torch.nn.Module) -> bool:
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
    return int(eos_positions(clip_model, text).max()) + 1


TEXT_LENGTH_MULTIPLE = 8
"""On a GPU the kept length is rounded up to a multiple of this: a few distinct shapes instead of one per
longest caption. Each new shape costs a new kernel plan (cuDNN's attention builds a graph per
shape: about 10 ms of CPU time per layer and call on an H200, more than the layer's GPU time),
and multiples of 8 suit tensor cores."""


def kept_text_length(clip_model: torch.nn.Module, text: torch.Tensor, multiple: int | None = None) -> int:
    """How many leading positions the trimmed tower runs: :func:`pooled_text_length` rounded up to
    ``multiple`` (default: :data:`TEXT_LENGTH_MULTIPLE` for tokens on a GPU, 1 on a CPU, whose
    kernels need no per-shape plan), at most the whole context."""
    if multiple is None:
        multiple = TEXT_LENGTH_MULTIPLE if text.is_cuda else 1
    needed = pooled_text_length(clip_model, text)
    return min(-(-needed // multiple) * multiple, text.shape[1])


def stream_dtype(clip_model: torch.nn.Module) -> torch.dtype:
    """The dtype of the text tower's residual stream: its token embedding's. open_clip's own
    ``get_cast_dtype`` reads a block's weight, which ``train.bf16_weights`` holds in bf16 while
    embeddings and norms stay fp32 (as under autocast); a model cast whole agrees with either."""
    return clip_model.token_embedding.weight.dtype


def text_tokens_trimmed(clip_model: torch.nn.Module, text: torch.Tensor) -> torch.Tensor:
    """Final-norm text tokens (N, L, W) of the first ``kept_text_length`` positions (all positions
    when trimming is not exact for this model); positions past a row's end-of-text are padding."""
    if text_padding_trim_supported(clip_model):
        length = kept_text_length(clip_model, text)
    else:
        length = text.shape[1]
    text = text[:, :length]
    cast_dtype = stream_dtype(clip_model)
    x = clip_model.token_embedding(text).to(cast_dtype)
    x = x + clip_model.positional_embedding[:length].to(cast_dtype)
    mask = clip_model.attn_mask[:length, :length] if clip_model.attn_mask is not None else None
    x = clip_model.transformer(x, attn_mask=mask)
    return clip_model.ln_final(x)


def project_text(clip_model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply the text projection (a Linear, a matrix or none) to features ``x`` (..., W)."""
    projection = clip_model.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def end_of_text_positions(clip_model: torch.nn.Module, text: torch.Tensor) -> torch.Tensor:
    """Each row's end-of-text position (the eos id where the model names one, else the highest id):
    the positions after it are padding."""
    if clip_model.text_pool_type == "eos":
        return (text == clip_model.text_eos_id).int().argmax(dim=-1)
    return text.argmax(dim=-1)


def eos_positions(clip_model: torch.nn.Module, text: torch.Tensor) -> torch.Tensor:
    """The position each row of ``text`` is pooled at, as open_clip's ``text_global_pool``: the
    end-of-text (``argmax`` / ``eos``), or the ``first`` / ``last`` position."""
    pool_type = clip_model.text_pool_type
    if pool_type == "first":
        return torch.zeros(text.shape[0], dtype=torch.long, device=text.device)
    if pool_type == "last":
        return torch.full((text.shape[0],), text.shape[1] - 1, dtype=torch.long, device=text.device)
    return end_of_text_positions(clip_model, text)


def encode_text_trimmed(clip_model: torch.nn.Module, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``clip_model.encode_text(text)`` computed on the first ``kept_text_length`` tokens only.

    Same modules, same operations and same pooled positions as open_clip's ``CLIP.encode_text``
    (token embedding, positional embedding, causal transformer, final norm, pooling,
    projection), with the positional embedding and causal mask cut to the kept length. Falls
    back to the model's own ``encode_text`` when trimming is not exact for it
    (:func:`text_padding_trim_supported`).
    """
    if text.dim() != 2 or not text_padding_trim_supported(clip_model):
        return clip_model.encode_text(text, normalize=normalize)
    length = kept_text_length(clip_model, text)
    text = text[:, :length]
    cast_dtype = stream_dtype(clip_model)
    x = clip_model.token_embedding(text).to(cast_dtype)
    x = x + clip_model.positional_embedding[:length].to(cast_dtype)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask[:length, :length])
    x = clip_model.ln_final(x)
    x = text_global_pool(x, text, clip_model.text_pool_type, eos_token_id=getattr(clip_model, "text_eos_id", None))
    projection = clip_model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return F.normalize(x, dim=-1) if normalize else x

"""Prompt-aware towers of open_clip CLIP models (text transformer and ViT image tower)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...base import Backbone
from ...prompting import (PromptLayout, PromptTextEncoder, PromptTokenizer, PromptVisionEncoder, append_prompts,
                          deep_splice, replace_last_prompts, splice)
from .text_trim import stream_dtype


def run_open_clip_blocks(transformer: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None,
                         before_block: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """open_clip ``Transformer.forward`` on (N, L, W) with a hook before every block."""
    for index, block in enumerate(transformer.resblocks):
        x = before_block(index, x)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
        if transformer.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=attn_mask)
        if not transformer.batch_first:
            x = x.transpose(0, 1)
    return x


class OpenClipTextEncoder(PromptTextEncoder):
    """open_clip ``CLIP``: token_embedding, positional_embedding, transformer, ln_final, text_projection."""

    def __init__(self, backbone: Backbone, method: str):
        clip = backbone.model
        if not hasattr(clip, "token_embedding") or hasattr(clip, "text"):
            raise NotImplementedError(
                f"method {method!r}: prompt learning on open_clip needs a CLIP text transformer "
                f"(model.token_embedding, model.transformer); {backbone.config_dict().get('name')!r} is a "
                f"{type(clip).__name__} with a separate text module, which is not supported yet")
        tokenizer = backbone.text_tokenizer.tokenizer
        if not all(hasattr(tokenizer, key) for key in ("encode", "sot_token_id", "eot_token_id")):
            raise NotImplementedError(f"method {method!r}: prompt learning on open_clip needs its CLIP BPE "
                                      f"tokenizer, got {type(tokenizer).__name__}")
        self.clip = clip
        self.width = int(clip.token_embedding.embedding_dim)
        self.num_layers = len(clip.transformer.resblocks)
        specials = (tokenizer.sot_token_id, tokenizer.eot_token_id)
        self.tokenizer = PromptTokenizer(
            encode=tokenizer.encode, prefix=[tokenizer.sot_token_id], suffix=[tokenizer.eot_token_id],
            max_length=int(clip.positional_embedding.shape[0]), pad_id=0, pad_to_max=True,
            placeholder_id=next(i for i in range(3) if i not in specials))

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.token_embedding(ids.to(self.clip.token_embedding.weight.device))

    def encode(self, layout: PromptLayout, ctx: torch.Tensor, deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        self._check_depth(deep_prompts)
        clip = self.clip
        cast_dtype = stream_dtype(clip)
        x = clip.token_embedding(layout.ids).to(cast_dtype)
        x = splice(x, layout.ctx_positions, ctx)
        x = x + clip.positional_embedding.to(cast_dtype)
        x = run_open_clip_blocks(clip.transformer, x, clip.attn_mask, deep_splice(layout.ctx_positions, deep_prompts))
        x = clip.ln_final(x)
        pooled = text_global_pool(x, layout.ids, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is None:
            return pooled
        if isinstance(clip.text_projection, nn.Linear):
            return clip.text_projection(pooled)
        return pooled @ clip.text_projection


class OpenClipVisionEncoder(PromptVisionEncoder):
    """open_clip ``VisionTransformer`` (conv1 patches, class token, ln_pre, resblocks, pool, proj)."""

    def __init__(self, visual: nn.Module, method: str):
        if not isinstance(visual, VisionTransformer):
            raise NotImplementedError(f"method {method!r}: vision prompts need an open_clip VisionTransformer image "
                                      f"tower; this model's is a {type(visual).__name__}")
        self.visual = visual
        self.width = int(visual.conv1.out_channels)
        self.num_layers = len(visual.transformer.resblocks)

    def encode(self, images: torch.Tensor, first: torch.Tensor | None = None,
               deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        self._check(first, deep_prompts)
        visual = self.visual
        x = visual._embeds(images)  # ends with ln_pre, a per-token norm: the prompts get it below
        count = 0
        if first is not None:
            count = first.shape[0]
            x = append_prompts(x, visual.ln_pre(first.to(x.dtype)))
        x = run_open_clip_blocks(visual.transformer, x, None, replace_last_prompts(count, deep_prompts))
        if count:
            x = x[:, :-count]
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

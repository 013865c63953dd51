"""Initial context vectors of learned prompts (CoOp, CoCoOp, MaPLe).

The prompt-aware towers themselves belong to the backbone families
(``Backbone.prompt_text_encoder`` / ``prompt_vision_encoder``; shared parts in
:mod:`domainclip.core.backbones.prompting`).
"""
from __future__ import annotations

import torch
from torch import nn

from ...backbones.prompting import PromptTextEncoder

CTX_INIT_STD = 0.02
"""Standard deviation of randomly initialised context vectors (CoOp)."""


def initial_context(encoder: PromptTextEncoder, n_ctx: int, ctx_init: str, method: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Initial context vectors (n_ctx, W) and the ids of ``ctx_init``'s tokens that stay fixed.

    With ``ctx_init`` the vectors are the token embeddings of its first ``n_ctx`` tokens (all of
    them for ``n_ctx`` 0); without it they are drawn from N(0, CTX_INIT_STD).
    """
    if not ctx_init.strip():
        vectors = torch.empty(n_ctx, encoder.width)
        nn.init.normal_(vectors, std=CTX_INIT_STD)
        return vectors, ()
    ids = encoder.tokenizer.encode(ctx_init)
    if not ids:
        raise ValueError(f"method {method!r}: ctx_init {ctx_init!r} has no tokens")
    count = n_ctx or len(ids)
    if count > len(ids):
        raise ValueError(f"method {method!r}: n_ctx={n_ctx} but ctx_init {ctx_init!r} has {len(ids)} tokens; "
                         f"set n_ctx to at most {len(ids)} (0 = all of them)")
    with torch.no_grad():
        vectors = encoder.token_embeddings(torch.tensor(ids[:count])).detach().float().cpu().clone()
    return vectors, tuple(ids[count:])

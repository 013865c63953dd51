"""How to run one transformer block of each family with merging: a registry keyed by block type.

A merging block runs attention with ToMe's proportional attention (each key's logit plus the log
of how many patches the token stands for), merges tokens, then runs the MLP on fewer tokens. A
family says how to do the two halves for its block type (:class:`BlockFamily`); the block type is
looked up along its class hierarchy, so a new backbone family whose blocks are one of the
registered types (SigLIP 2 reuses the SigLIP layer's layout) needs no code here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (block, tokens (B, N, D), key bias (B, N) or None) -> (tokens after attention + residual, keys (B, N, d))
Attend = Callable[[nn.Module, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BlockFamily:
    """The two halves of a pre-norm transformer block, on batch-first tokens.

    Attributes:
        name: family name (for messages).
        attend: the attention half with a key bias; returns the new tokens and the keys averaged
            over heads (ToMe's similarity metric).
        feed_forward: the MLP half with its residual.
        batch_first: whether the block receives (B, N, D) rather than (N, B, D) tokens.
    """

    name: str
    attend: Attend
    feed_forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    batch_first: Callable[[nn.Module], bool] = lambda block: True


BLOCK_FAMILIES: dict[type, BlockFamily] = {}


def register_block_family(block_type: type, family: BlockFamily) -> None:
    """Make blocks of ``block_type`` (and its subclasses) mergeable."""
    BLOCK_FAMILIES[block_type] = family


def family_of(block: nn.Module, name: str = "") -> BlockFamily:
    """The family registered for ``block``'s type or its nearest registered base class."""
    for cls in type(block).__mro__:
        if cls in BLOCK_FAMILIES:
            return BLOCK_FAMILIES[cls]
    known = sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in BLOCK_FAMILIES)
    raise ValueError(f"token merging: block {name or '?'} is a {type(block).__module__}.{type(block).__qualname__}, "
                     f"which has no registered merging forward (registered block types: {known}); register one with "
                     f"domainclip.core.token_merging.register_block_family")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float | None,
              dropout: float) -> torch.Tensor:
    """Scaled dot-product attention on (B, heads, N, d) with an additive per-key bias (B, N)."""
    mask = bias[:, None, None, :].to(q.dtype) if bias is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads * d) -> (B, heads, N, d)."""
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def join_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


# --- open_clip: ResidualAttentionBlock (nn.MultiheadAttention, or LoRA's split projections) -------
def _open_clip_attend(block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    attn = block.attn
    h = block.ln_1(x)
    if isinstance(attn, nn.MultiheadAttention):
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    else:  # SeparateProjectionAttention: LoRA split the packed projection into q/k/v/out layers
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    q, k, v = (split_heads(t, attn.num_heads) for t in (q, k, v))
    out = attention(q, k, v, bias, None, attn.dropout if block.training else 0.0)
    return x + block.ls_1(attn.out_proj(join_heads(out))), k.mean(dim=1)


def _open_clip_feed_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + block.ls_2(block.mlp(block.ln_2(x)))


# --- Hugging Face: CLIPEncoderLayer, SiglipEncoderLayer, Siglip2EncoderLayer -------------------------
def _hf_attend(block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    attn = block.self_attn
    h = block.layer_norm1(x)
    q, k, v = (split_heads(proj(h), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = attention(q, k, v, bias, attn.scale, attn.dropout if block.training else 0.0)
    return x + attn.out_proj(join_heads(out)), k.mean(dim=1)


def _hf_feed_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + block.mlp(block.layer_norm2(x))


# --- timm: vision_transformer.Block ---------------------------------------------------------------
def _timm_attend(block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    attn = block.attn
    if getattr(attn, "gate", None) is not None or not isinstance(getattr(attn, "qkv", None), nn.Linear):
        raise ValueError(f"token merging: timm attention {type(attn).__name__} with a gate or without a fused qkv "
                         f"layer is not supported")
    h = block.norm1(x)
    batch, tokens, _ = h.shape
    q, k, v = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attention(q, k, v, bias, attn.scale, attn.attn_drop.p if block.training else 0.0)
    out = attn.proj_drop(attn.proj(attn.norm(join_heads(out))))
    return x + block.drop_path1(block.ls1(out)), k.mean(dim=1)


def _timm_feed_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _register_builtin() -> None:
    """The families of the kit's backbones (each library only when it is installed)."""
    try:
        from open_clip.transformer import ResidualAttentionBlock
    except ImportError:
        pass
    else:
        register_block_family(ResidualAttentionBlock, BlockFamily(
            "open_clip", _open_clip_attend, _open_clip_feed_forward,
            batch_first=lambda block: getattr(block.attn, "batch_first", True)))
    hf = BlockFamily("transformers", _hf_attend, _hf_feed_forward)
    for module, name in (("transformers.models.clip.modeling_clip", "CLIPEncoderLayer"),
                         ("transformers.models.siglip.modeling_siglip", "SiglipEncoderLayer"),
                         ("transformers.models.siglip2.modeling_siglip2", "Siglip2EncoderLayer")):
        try:
            register_block_family(getattr(__import__(module, fromlist=[name]), name), hf)
        except (ImportError, AttributeError):
            pass
    try:
        from timm.models.vision_transformer import Block
    except ImportError:
        pass
    else:
        register_block_family(Block, BlockFamily("timm", _timm_attend, _timm_feed_forward))


_register_builtin()

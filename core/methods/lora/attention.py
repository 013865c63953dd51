"""``nn.MultiheadAttention`` with its projections as four separate ``nn.Linear`` layers.

open_clip builds its transformer blocks from ``nn.MultiheadAttention``, whose query/key/value
projection is one packed parameter (``in_proj_weight``) and whose output projection's ``forward``
is never called. peft 0.21's LoRA layer for it works by merging the adapter into those weights
around every forward call: it cannot adapt q, k and v separately, always adapts the output
projection, has no DoRA, and swaps parameters in and out of the module on every call. Converting
the attention into :class:`SeparateProjectionAttention` instead gives ordinary ``q_proj``,
``k_proj``, ``v_proj`` and ``out_proj`` Linear layers that peft's standard LoRA/DoRA layers wrap;
:func:`join_attention` turns it back into an ``nn.MultiheadAttention`` with the original names.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SeparateProjectionAttention(nn.Module):
    """Self/cross attention computing what ``nn.MultiheadAttention`` computes, with Linear projections.

    Supports the ``nn.MultiheadAttention`` call signature (``batch_first`` or not, unbatched
    inputs, ``attn_mask`` of shape (L, S) or (N * heads, L, S), boolean or additive,
    ``key_padding_mask``, ``need_weights``, ``average_attn_weights``, ``is_causal``) for the
    layout open_clip uses: query, key and value of one width, no ``bias_k``/``bias_v``, no
    ``add_zero_attn``.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @classmethod
    def from_multihead(cls, attention: nn.MultiheadAttention, name: str = "") -> "SeparateProjectionAttention":
        """A copy of ``attention`` (same weights, same outputs) with separate projections."""
        where = f"{name or 'attention'} ({type(attention).__name__})"
        if not attention._qkv_same_embed_dim:
            raise ValueError(f"{where}: query, key and value have different widths (kdim/vdim); "
                             f"only same-width attention can be split")
        if attention.bias_k is not None or attention.add_zero_attn:
            raise ValueError(f"{where}: bias_k/bias_v/add_zero_attn are not supported")
        has_bias = attention.in_proj_bias is not None
        weight = attention.in_proj_weight
        split = cls(attention.embed_dim, attention.num_heads, attention.dropout, has_bias, attention.batch_first,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for index, projection in enumerate((split.q_proj, split.k_proj, split.v_proj)):
                rows = slice(index * attention.embed_dim, (index + 1) * attention.embed_dim)
                projection.weight.copy_(weight[rows])
                if has_bias:
                    projection.bias.copy_(attention.in_proj_bias[rows])
            split.out_proj.weight.copy_(attention.out_proj.weight)
            if has_bias:
                split.out_proj.bias.copy_(attention.out_proj.bias)
        split.train(attention.training)
        _copy_requires_grad(split, attention.in_proj_weight.requires_grad)
        return split

    def to_multihead(self) -> nn.MultiheadAttention:
        """The equivalent ``nn.MultiheadAttention`` (parameter names as open_clip's checkpoints)."""
        for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
            if type(getattr(self, part)) is not nn.Linear:
                raise TypeError(f"{part} is a {type(getattr(self, part)).__name__}; merge or remove adapters before "
                                f"turning the attention back into nn.MultiheadAttention")
        weight = self.q_proj.weight
        has_bias = self.q_proj.bias is not None
        joined = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=has_bias,
                                       batch_first=self.batch_first, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            joined.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
            joined.out_proj.weight.copy_(self.out_proj.weight)
            if has_bias:
                joined.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
                joined.out_proj.bias.copy_(self.out_proj.bias)
        joined.train(self.training)
        return joined

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")  # as nn.MultiheadAttention
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, target_len, source_len = query.shape[0], query.shape[1], key.shape[1]

        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        mask = self._additive_mask(attn_mask, key_padding_mask, batch, target_len, source_len, q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            attended = F.dropout(weights, p=dropout) @ v
        else:
            weights = None
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        output = self.out_proj(attended.transpose(1, 2).reshape(batch, target_len, self.embed_dim))

        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            return output.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            output = output.transpose(0, 1)
        return output, weights

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, E) -> (N, heads, L, head_dim)."""
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _additive_mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int,
                       target_len: int, source_len: int, dtype: torch.dtype) -> torch.Tensor | None:
        """One float mask broadcastable to (N, heads, L, S); True in a boolean mask means "masked out"."""
        mask = None
        if attn_mask is not None:
            mask = _as_additive(attn_mask, dtype)
            if mask.dim() == 3:
                if mask.shape[0] == self.num_heads and batch == 1:
                    mask = mask.unsqueeze(0)
                else:
                    mask = mask.reshape(batch, self.num_heads, target_len, source_len)
        if key_padding_mask is not None:
            padding = _as_additive(key_padding_mask, dtype).reshape(batch, 1, 1, source_len)
            mask = padding if mask is None else mask + padding
        return mask


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _copy_requires_grad(module: nn.Module, requires_grad: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(requires_grad)


def split_attention(root: nn.Module, names: list[str]) -> list[str]:
    """Replace each ``nn.MultiheadAttention`` named in ``names`` by a :class:`SeparateProjectionAttention`."""
    modules = dict(root.named_modules())
    for name in names:
        attention = modules.get(name)
        if not isinstance(attention, nn.MultiheadAttention):
            raise TypeError(f"{name} is a {type(attention).__name__}, not an nn.MultiheadAttention")
        set_submodule(root, name, SeparateProjectionAttention.from_multihead(attention, name))
    return list(names)


def join_attention(root: nn.Module, names: list[str] | None = None) -> list[str]:
    """Turn :class:`SeparateProjectionAttention` modules (all, or those in ``names``) back into
    ``nn.MultiheadAttention``; returns the names converted."""
    found = [name for name, module in root.named_modules() if isinstance(module, SeparateProjectionAttention)]
    chosen = found if names is None else [name for name in found if name in set(names)]
    for name in chosen:
        set_submodule(root, name, root.get_submodule(name).to_multihead())
    return chosen


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)

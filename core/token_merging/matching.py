"""Which tokens merge: ToMe's bipartite soft matching and PiToMe's energy-protected variant.

Both return a function that merges any per-token tensor (B, N, C) the same way, summing merged
tokens (callers merge ``x * size`` and ``size`` and divide: a size-weighted average). Sums go
through ``scatter_add``, so the graph exports to ONNX (ScatterElements with ``add``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Merge = Callable[[torch.Tensor], torch.Tensor]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, K) of ``x`` (B, N, C)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _merge_into(keep: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, dst_of_src: torch.Tensor) -> torch.Tensor:
    """``keep`` then ``dst`` with each ``src`` row added to its destination row."""
    dst = dst.scatter_add(1, dst_of_src[..., None].expand(-1, -1, dst.shape[-1]), src)
    return torch.cat([keep, dst], dim=1)


def tome_matching(metric: torch.Tensor, r: int) -> Merge:
    """ToMe (Bolya et al. 2023): alternate tokens into sets A and B, link each A token to its most
    similar B token (cosine of ``metric``), merge the ``r`` most similar links. 0 <= r <= N // 2."""
    with torch.no_grad():
        metric = F.normalize(metric, dim=-1)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src_index, keep_index = order[:, :r], order[:, r:]
        dst_of_src = best_dst.gather(1, src_index)

    def merge(x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        return _merge_into(_gather(a, keep_index), _gather(a, src_index), b, dst_of_src)

    return merge


def pitome_matching(metric: torch.Tensor, r: int, margin: float) -> Merge:
    """PiToMe (Tran et al. 2024): a token's energy is the mean of ``elu(cos - margin)`` over all
    tokens; the 2r highest-energy (most redundant) tokens are split alternately into A and B and
    every A token merges into its most similar B token; the rest (informative, isolated tokens)
    are kept as they are. 0 <= r <= N // 2."""
    with torch.no_grad():
        metric = F.normalize(metric, dim=-1)
        similarity = metric @ metric.transpose(-1, -2)
        energy = F.elu(similarity - margin).mean(dim=-1)
        order = energy.argsort(dim=-1, descending=True)
        a_index, b_index, keep_index = order[:, 0:2 * r:2], order[:, 1:2 * r:2], order[:, 2 * r:]
        rows = similarity.gather(1, a_index[..., None].expand(-1, -1, similarity.shape[-1]))
        dst_of_src = rows.gather(2, b_index[:, None, :].expand(-1, r, -1)).argmax(dim=-1)

    def merge(x: torch.Tensor) -> torch.Tensor:
        return _merge_into(_gather(x, keep_index), _gather(x, a_index), _gather(x, b_index), dst_of_src)

    return merge


def pitome_margin(block: int, blocks: int) -> float:
    """PiToMe's margin schedule: 0.9 in the first block, falling linearly towards 0 with depth."""
    return 0.9 - 0.9 * block / blocks

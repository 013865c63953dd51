"""Install token merging in a backbone's image tower, and remove it again.

The tower's blocks are found through the backbone's ``block_prefixes["image"]`` and each gets a
merging ``forward`` (an instance attribute: weights, state-dict keys and the block's class are
unchanged, and ``copy.deepcopy`` copies it along). The first block resets the per-image token
sizes; each block merges ``r_i`` tokens after its attention. The leading class / register tokens
are never merged. ``r = 0`` installs nothing: the model is exactly the unmerged one.
"""
from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..backbones.base import Backbone, tower_blocks
from .blocks import BlockFamily, family_of
from .config import TokenMergingConfig
from .matching import pitome_margin, pitome_matching, tome_matching

PREFIX_TOKEN_PARAMETERS = ("class_embedding", "cls_token")


class TowerMerging:
    """The merging state of one image tower (shared by its blocks).

    Attributes:
        cfg: the setting.
        protected: leading tokens never merged (class and register tokens).
        fixed: a fixed per-block schedule (ONNX export), else computed per input length.
        tokens: token counts of the last forward: entering each block, then leaving the last.
    """

    def __init__(self, cfg: TokenMergingConfig, blocks: list[tuple[str, nn.Module]], protected: int,
                 fixed: Sequence[int] | None = None):
        self.cfg = cfg
        self.blocks = [name for name, _ in blocks]
        self.protected = protected
        self.fixed = list(fixed) if fixed is not None else None
        self.linear_per_token = [_linear_weights(block) for _, block in blocks]
        self.size: torch.Tensor | None = None
        self.schedule: list[int] = []
        self.tokens: list[int] = []
        self._schedules: dict[tuple[int, int], list[int]] = {}

    def key(self) -> dict[str, Any]:
        """What merged features depend on (feature cache, ONNX metadata)."""
        key = {**self.cfg.key(), "protected": self.protected}
        if self.fixed is not None:
            key["schedule"] = self.fixed
        return key

    def begin(self, tokens: int, width: int) -> None:
        self.size = None
        self.tokens = []
        if self.fixed is not None:
            self.schedule = self.fixed
        else:
            if (tokens, width) not in self._schedules:
                self._schedules[(tokens, width)] = self.plan(tokens, width)
            self.schedule = self._schedules[(tokens, width)]

    def plan(self, tokens: int, width: int) -> list[int]:
        """Per-block r for ``tokens`` input tokens: ``cfg.r``, or the one meeting ``cfg.flop_ratio``."""
        if not self.cfg.flop_ratio:
            return self.constant(self.cfg.r, tokens)
        full = self.flops([0] * len(self.blocks), tokens, width)
        largest = (tokens - self.protected) // 2
        for r in range(0, largest + 1):  # flop_ratio 1.0: r = 0, nothing merged
            schedule = self.constant(r, tokens)
            if self.flops(schedule, tokens, width) <= self.cfg.flop_ratio * full:
                return schedule
        least = self.flops(self.constant(largest, tokens), tokens, width) / full
        raise ValueError(f"token_merging.flop_ratio {self.cfg.flop_ratio} is out of reach for {tokens} tokens: "
                         f"the most merging (r={largest}) leaves {least:.3f} of the FLOPs")

    def constant(self, r: int, tokens: int) -> list[int]:
        """``r`` in every block, fewer where fewer than 2r mergeable tokens remain."""
        schedule = []
        for _ in self.blocks:
            step = min(r, (tokens - self.protected) // 2)
            schedule.append(step)
            tokens -= step
        return schedule

    def flops(self, schedule: Sequence[int], tokens: int, width: int) -> float:
        """Multiply-adds of the tower's blocks: q/k/v/out projections and attention on the tokens
        entering a block, the MLP on those left after its merge."""
        total = 0.0
        for r, linear in zip(schedule, self.linear_per_token):
            attention_linear = 4 * width * width
            total += tokens * attention_linear + 2 * tokens * tokens * width
            tokens -= r
            total += tokens * max(linear - attention_linear, 0)
        return total

    def merge(self, index: int, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s merge of tokens ``x`` (B, N, D) by similarity of ``metric`` (B, N, d)."""
        r = self.schedule[index]
        size = self.size if self.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)
        if r:
            p = self.protected
            if self.cfg.algorithm == "pitome":
                merge = pitome_matching(metric[:, p:], r, pitome_margin(index, len(self.blocks)))
            else:
                merge = tome_matching(metric[:, p:], r)
            merged_size = merge(size[:, p:])
            x = torch.cat([x[:, :p], merge(x[:, p:] * size[:, p:]) / merged_size], dim=1)
            size = torch.cat([size[:, :p], merged_size], dim=1)
        self.size = size
        return x


def _linear_weights(block: nn.Module) -> int:
    """Weights of the block's matrices: its multiply-adds per token in the linear layers."""
    return sum(p.numel() for p in block.parameters() if p.ndim == 2)


def _merging_forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The block's forward with merging (installed as ``block.forward``)."""
    state, index, family = self._token_merging
    args = list(args)
    x = args.pop(0) if args else kwargs.pop(next(iter(kwargs)))
    _check_no_mask(args, kwargs, state.blocks[index])
    batch_first = family.batch_first(self)
    if not batch_first:
        x = x.transpose(0, 1)
    if index == 0:
        state.begin(x.shape[1], x.shape[2])
    state.tokens.append(x.shape[1])
    bias = state.size.log()[..., 0] if state.size is not None else None
    x, metric = family.attend(self, x, bias)
    x = family.feed_forward(self, state.merge(index, x, metric))
    if index == len(state.blocks) - 1:
        state.tokens.append(x.shape[1])
    return x.transpose(0, 1) if not batch_first else x


def _check_no_mask(args: list[Any], kwargs: dict[str, Any], name: str) -> None:
    """Image towers pass no attention mask (or an all-zero additive one); merging cannot honour one."""
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and (value.dtype == torch.bool or bool(value.any())):
            raise ValueError(f"token merging: block {name} got an attention mask or extra input of shape "
                             f"{tuple(value.shape)}; merging supports image towers without masks (no padded patches)")


def prefix_tokens(model: Backbone) -> int:
    """Leading tokens of the image tower that are never merged: timm's ``num_prefix_tokens``, else
    one class token when the tower has a class-embedding parameter (SigLIP has none)."""
    prefixes = tuple(model.tower_prefixes["image"])
    for name, module in model.named_modules():
        if name.startswith(prefixes) and isinstance(getattr(module, "num_prefix_tokens", None), int):
            return module.num_prefix_tokens
    return int(any(name.startswith(prefixes) and name.rsplit(".", 1)[-1] in PREFIX_TOKEN_PARAMETERS
                   for name, _ in model.named_parameters()))


def refuse_unmergeable(model: Backbone, subject: str = "this model") -> None:
    """Raise when ``model`` cannot merge image tokens (MaPLe's prompted tower), naming ``subject``."""
    if model.token_merging_refusal:
        raise ValueError(f"token merging is not supported by {subject}: {model.token_merging_refusal}")


def apply_token_merging(model: Backbone, cfg: TokenMergingConfig | None,
                        schedule: Sequence[int] | None = None) -> Backbone:
    """Install ``cfg`` in ``model``'s image tower (in place; replaces an earlier setting) and return it.

    ``schedule`` fixes r per block (ONNX export; a list as long as the tower's blocks). A ``cfg``
    of None or with ``r = 0`` and no ``flop_ratio`` removes merging and installs nothing.
    """
    remove_token_merging(model)
    if cfg is None or not (cfg.active or schedule is not None):
        return model
    refuse_unmergeable(model)
    blocks = tower_blocks(model, "image")
    if not blocks:
        raise ValueError(f"token merging: the image tower of this {model.kind} backbone has no blocks named "
                         f"{model.block_prefixes.get('image', '?')}N")
    families: list[BlockFamily] = [family_of(block, name) for name, block in blocks]
    if schedule is not None and len(schedule) != len(blocks):
        raise ValueError(f"token merging: schedule has {len(schedule)} entries for {len(blocks)} blocks")
    state = TowerMerging(cfg, blocks, prefix_tokens(model), schedule)
    for index, ((_, block), family) in enumerate(zip(blocks, families)):
        block._token_merging = (state, index, family)
        block.forward = types.MethodType(_merging_forward, block)
    model.token_merging = state
    return model


def remove_token_merging(model: Backbone) -> Backbone:
    """Restore the blocks' own forward (a no-op on a model without merging)."""
    for module in model.modules():
        if "_token_merging" in vars(module):
            del module._token_merging
            del module.forward
    if "token_merging" in vars(model):
        del model.token_merging
    return model


def merging_of(model: nn.Module) -> TowerMerging | None:
    """The merging installed in ``model``, if any."""
    return vars(model).get("token_merging")


def merging_config(model: nn.Module) -> TokenMergingConfig | None:
    """The setting installed in ``model``, if any."""
    state = merging_of(model)
    return state.cfg if state is not None else None


def token_merging_key(model: nn.Module) -> dict[str, Any] | None:
    """The merge setting image features of ``model`` depend on; None without merging."""
    state = merging_of(model)
    return state.key() if state is not None else None


@contextmanager
def token_merging(model: Backbone, cfg: TokenMergingConfig | None) -> Iterator[Backbone]:
    """``model`` with ``cfg`` installed for the block; the earlier setting is restored after."""
    earlier = merging_of(model)
    apply_token_merging(model, cfg)
    try:
        yield model
    finally:
        apply_token_merging(model, earlier.cfg if earlier else None, earlier.fixed if earlier else None)

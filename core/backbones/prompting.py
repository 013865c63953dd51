"""Where prompt learning inserts tokens: the part of the backbone interface CoOp, CoCoOp and MaPLe use.

A learned prompt is a token sequence in which some positions hold learned vectors instead of
word embeddings: "[BOS] v1 v2 v3 v4 red . [EOS]". Each backbone family lays the sequence out with
its own tokenizer (:class:`PromptTokenizer`; a context initialised from "a photo of a" gives
exactly the features of the text "a photo of a red.") and runs it through its frozen text tower
(:class:`PromptTextEncoder`), which can also overwrite the context positions with deeper prompts
before any block (MaPLe). Vision prompts (:class:`PromptVisionEncoder`) are appended after the
image tokens, replaced before each deeper block and dropped before pooling.

Families return their encoders from ``Backbone.prompt_text_encoder`` / ``prompt_vision_encoder``;
this module holds only what every family shares.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

@dataclass(frozen=True)
class ContextSlot:
    """``count`` consecutive learned context vectors inside a prompt."""

    count: int


Piece = ContextSlot | str | tuple[int, ...]
"""Part of a prompt: learned vectors, text to tokenize, or token ids used as they are."""


@dataclass
class PromptLayout:
    """A batch of prompts as token ids with the positions of their learned vectors.

    Attributes:
        ids: (N, L) token ids; context positions hold a neutral placeholder id.
        attention_mask: (N, L) 1 for tokens, 0 for padding.
        ctx_positions: (N, n_ctx) sequence positions of the context vectors, in context order.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    ctx_positions: torch.Tensor

    def to(self, device: torch.device) -> PromptLayout:
        return PromptLayout(self.ids.to(device), self.attention_mask.to(device), self.ctx_positions.to(device))

    def tile(self, times: int) -> PromptLayout:
        """The whole batch ``times`` times over (prompt order: copy-major)."""
        return PromptLayout(self.ids.repeat(times, 1), self.attention_mask.repeat(times, 1),
                            self.ctx_positions.repeat(times, 1))


class PromptTokenizer:
    """Lays prompt pieces out as one id sequence, as the backbone's tokenizer lays out text.

    Pieces are tokenized one by one without special tokens, joined, and wrapped in the
    tokenizer's own special tokens; words tokenize independently of their neighbours in the
    CLIP BPE and WordPiece tokenizers, so this equals tokenizing the joined text.
    """

    def __init__(self, encode: Callable[[str], list[int]], prefix: Sequence[int], suffix: Sequence[int],
                 max_length: int, pad_id: int, pad_to_max: bool, placeholder_id: int):
        self.encode = encode
        self.prefix = list(prefix)
        self.suffix = list(suffix)
        self.max_length = max_length
        self.pad_id = pad_id
        self.pad_to_max = pad_to_max
        self.placeholder_id = placeholder_id

    def layout(self, prompts: Sequence[Sequence[Piece]], names: Sequence[str]) -> PromptLayout:
        """Ids, mask and context positions of ``prompts``; ``names`` label them in errors."""
        sequences, positions = [], []
        for pieces, name in zip(prompts, names):
            ids, ctx = list(self.prefix), []
            for piece in pieces:
                if isinstance(piece, ContextSlot):
                    ctx.extend(range(len(ids), len(ids) + piece.count))
                    ids.extend([self.placeholder_id] * piece.count)
                elif isinstance(piece, str):
                    ids.extend(self.encode(piece))
                else:
                    ids.extend(piece)
            ids.extend(self.suffix)
            if len(ids) > self.max_length:
                raise ValueError(f"the prompt of class {name!r} has {len(ids)} tokens with its learned context, "
                                 f"more than the text tower's context length {self.max_length}; "
                                 "shorten the class name or use a smaller method.n_ctx")
            sequences.append(ids)
            positions.append(ctx)
        if len({len(p) for p in positions}) > 1:
            raise ValueError("every prompt of a batch must hold the same number of context vectors")
        length = self.max_length if self.pad_to_max else max(len(ids) for ids in sequences)
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, :len(sequence)] = 1
        return PromptLayout(ids, mask, torch.tensor(positions, dtype=torch.long).reshape(len(sequences), -1))


def splice(hidden: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``hidden`` (N, L, W) with the rows at ``positions`` (N, n) replaced by ``values``.

    ``values`` is (n, W) (the same for every sequence) or (N, n, W). Out of place, so gradients
    flow into ``values``.
    """
    count, n = positions.shape
    width = hidden.shape[-1]
    if values.ndim == 2:
        values = values.unsqueeze(0).expand(count, n, width)
    rows = torch.arange(count, device=hidden.device).unsqueeze(1).expand(count, n)
    return hidden.index_put((rows.reshape(-1), positions.reshape(-1)), values.reshape(-1, width).to(hidden.dtype))


class PromptTextEncoder:
    """A backbone's frozen text tower run on token embeddings with learned vectors spliced in.

    Not an ``nn.Module``: it only refers to the backbone's modules, so they are neither
    registered twice nor saved with the prompts.
    """

    tokenizer: PromptTokenizer
    width: int
    num_layers: int

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings (no positions) of ``ids``: (..., W)."""
        raise NotImplementedError

    def encode(self, layout: PromptLayout, ctx: torch.Tensor, deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Unnormalised text features (N, D) of ``layout`` with ``ctx`` (n_ctx, W) or (N, n_ctx, W)
        at its context positions; ``deep_prompts[i]`` (n_ctx, W) overwrites them before block i + 1."""
        raise NotImplementedError

    def _check_depth(self, deep_prompts: Sequence[torch.Tensor]) -> None:
        if len(deep_prompts) >= self.num_layers:
            raise ValueError(f"{len(deep_prompts)} deep text prompts but the text tower has {self.num_layers} layers "
                             f"(at most {self.num_layers - 1} after the first)")


class PromptVisionEncoder:
    """A backbone's frozen image tower with prompt tokens; refers to, never owns, its modules."""

    width: int
    num_layers: int

    def encode(self, images: torch.Tensor, first: torch.Tensor | None = None,
               deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Unnormalised image features (B, D) with ``first`` (n, W) prompt tokens appended and
        ``deep_prompts[i]`` (n, W) in their place before block i + 1; no prompts = the plain tower."""
        raise NotImplementedError

    def _check(self, first: torch.Tensor | None, deep_prompts: Sequence[torch.Tensor]) -> None:
        if deep_prompts and first is None:
            raise ValueError("deep vision prompts need first-layer prompts to replace")
        if len(deep_prompts) >= self.num_layers:
            raise ValueError(f"{len(deep_prompts)} deep vision prompts but the image tower has {self.num_layers} "
                             f"layers (at most {self.num_layers - 1} after the first)")


def append_prompts(x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Tokens ``x`` (B, L, W) followed by the same ``prompts`` (n, W) for every image: (B, L + n, W)."""
    return torch.cat([x, prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)


def replace_last_prompts(count: int, deep_prompts: Sequence[torch.Tensor]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A before-block hook putting ``deep_prompts[i - 1]`` in the last ``count`` tokens before block i >= 1."""

    def hook(index: int, x: torch.Tensor) -> torch.Tensor:
        if 1 <= index <= len(deep_prompts):
            return append_prompts(x[:, :-count], deep_prompts[index - 1])
        return x

    return hook


def run_hf_layer(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, **kwargs) -> torch.Tensor:
    """One transformers encoder layer; with gradient checkpointing on it is honoured in eval mode too
    (transformers checkpoints only in train mode, but frozen towers run in eval mode here)."""
    if getattr(layer, "gradient_checkpointing", False) and not layer.training and torch.is_grad_enabled():
        return checkpoint(layer, x, mask, use_reentrant=False, **kwargs)
    return layer(x, mask, **kwargs)


def deep_splice(positions: torch.Tensor, deep_prompts: Sequence[torch.Tensor]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A before-block hook writing ``deep_prompts[i - 1]`` at ``positions`` before block i >= 1."""

    def hook(index: int, x: torch.Tensor) -> torch.Tensor:
        if 1 <= index <= len(deep_prompts):
            return splice(x, positions, deep_prompts[index - 1])
        return x

    return hook


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids a Hugging Face tokenizer puts before and after a text's tokens."""
    content = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(content) + 1):
        if full[start:start + len(content)] == content:
            return full[:start], full[start + len(content):]
    raise NotImplementedError(f"cannot tell where {type(tokenizer).__name__} puts its special tokens")

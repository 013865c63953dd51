"""Prompt-aware text encoding for each backbone family (the dual encoder's in ``dual_encoders.py``).

A learned prompt is a token sequence in which some positions hold learned vectors instead of
word embeddings: "[BOS] v1 v2 v3 v4 red . [EOS]". The sequence is laid out with the backbone's
own tokenizer (so a context initialised from "a photo of a" gives exactly the features of the
text "a photo of a red.") and run through the frozen text transformer of the family, which can
also overwrite the context positions with deeper prompts before any block (MaPLe).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...backbones.base import Backbone

CTX_INIT_STD = 0.02
"""Standard deviation of randomly initialised context vectors (CoOp)."""


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
        from open_clip.transformer import text_global_pool

        self._check_depth(deep_prompts)
        clip = self.clip
        cast_dtype = clip.transformer.get_cast_dtype()
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


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids a Hugging Face tokenizer puts before and after a text's tokens."""
    content = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(content) + 1):
        if full[start:start + len(content)] == content:
            return full[:start], full[start + len(content):]
    raise NotImplementedError(f"cannot tell where {type(tokenizer).__name__} puts its special tokens")


class HFClipTextEncoder(PromptTextEncoder):
    """transformers ``CLIPModel``: text_model (embeddings, encoder.layers, final_layer_norm), text_projection."""

    def __init__(self, backbone: Backbone, method: str):
        if getattr(backbone, "is_siglip", False):
            raise NotImplementedError(f"method {method!r}: prompt learning supports Hugging Face CLIP text towers; "
                                      "SigLIP is not supported yet")
        self.hf = backbone.model
        self.text = self.hf.text_model
        wrapper = backbone.text_tokenizer
        tokenizer = wrapper.tokenizer
        prefix, suffix = special_token_frame(tokenizer)
        eos_id = self.text.eos_token_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.width = int(self.text.config.hidden_size)
        self.num_layers = len(self.text.encoder.layers)
        self.tokenizer = PromptTokenizer(
            encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], prefix=prefix, suffix=suffix,
            max_length=int(wrapper.max_length), pad_id=pad_id, pad_to_max=bool(wrapper.pad_to_max),
            placeholder_id=next(i for i in range(4) if i not in (*prefix, *suffix, eos_id)))

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        embedding = self.text.embeddings.token_embedding
        return embedding(ids.to(embedding.weight.device))

    def _eos_positions(self, ids: torch.Tensor) -> torch.Tensor:
        # transformers' CLIPTextModel rule: legacy configs (eos id 2) pool at the highest id,
        # others at the first eos token
        if self.text.eos_token_id == 2:
            return ids.to(torch.int).argmax(dim=-1)
        return (ids == self.text.eos_token_id).int().argmax(dim=-1)

    def encode(self, layout: PromptLayout, ctx: torch.Tensor, deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        self._check_depth(deep_prompts)
        x = splice(self.token_embeddings(layout.ids), layout.ctx_positions, ctx)
        x = self.text.embeddings(inputs_embeds=x)
        mask = create_causal_mask(config=self.text.config, inputs_embeds=x, attention_mask=layout.attention_mask,
                                  cache=None)
        hook = deep_splice(layout.ctx_positions, deep_prompts)
        for index, layer in enumerate(self.text.encoder.layers):
            x = run_hf_layer(layer, hook(index, x), mask, is_causal=True)
        x = self.text.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self._eos_positions(layout.ids)]
        return self.hf.text_projection(pooled)


def build_text_encoder(backbone: Backbone, method: str) -> PromptTextEncoder:
    """The prompt-aware text encoder of ``backbone``'s family (open_clip CLIP, HF CLIP, or a dual
    encoder's BERT-like text tower)."""
    from ...backbones.dual_encoder import DualEncoder
    from ...backbones.hf import HFClipBackbone
    from ...backbones.open_clip import OpenClipBackbone

    if isinstance(backbone, OpenClipBackbone):
        return OpenClipTextEncoder(backbone, method)
    if isinstance(backbone, HFClipBackbone):
        return HFClipTextEncoder(backbone, method)
    if isinstance(backbone, DualEncoder):
        from .dual_encoders import BertLikeTextEncoder

        return BertLikeTextEncoder(backbone, method)
    raise ValueError(f"method {method!r}: prompt learning needs a text transformer whose input words it can replace "
                     f"(model.kind 'open_clip' or 'hf' CLIP, or a 'dual_encoder' / 'compact_base' with a BERT-like "
                     f"text encoder); model.kind {backbone.kind!r} ({type(backbone).__name__}) has none")


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

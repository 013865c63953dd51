"""Prompt-aware towers of Hugging Face CLIP (causal text pooled at end-of-text; CLS-pooled image) and
SigLIP (bidirectional text pooled at the last position; image pooled by an attention head)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from ...base import Backbone
from ...prompting import (PromptLayout, PromptTextEncoder, PromptTokenizer, PromptVisionEncoder, append_prompts,
                          deep_splice, replace_last_prompts, run_hf_layer, special_token_frame, splice)


class HFClipTextEncoder(PromptTextEncoder):
    """transformers ``CLIPModel``: text_model (embeddings, encoder.layers, final_layer_norm), text_projection."""

    def __init__(self, backbone: Backbone, method: str):
        self.hf = backbone.model
        self.text = self.hf.text_model
        wrapper = backbone.text_tokenizer
        tokenizer = wrapper.tokenizer
        prefix, suffix = special_token_frame(tokenizer)
        eos_id = getattr(self.text, "eos_token_id", None)  # CLIP pools at it; SigLIP at the last position
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

    @staticmethod
    def eos_positions(text_model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """Where transformers' CLIPTextModel pools: legacy configs (eos id 2) at the highest id,
        others at the first eos token."""
        if text_model.eos_token_id == 2:
            return ids.to(torch.int).argmax(dim=-1)
        return (ids == text_model.eos_token_id).int().argmax(dim=-1)

    def encode(self, layout: PromptLayout, ctx: torch.Tensor, deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        self._check_depth(deep_prompts)
        x = splice(self.token_embeddings(layout.ids), layout.ctx_positions, ctx)
        x = self.text.embeddings(inputs_embeds=x)
        mask = create_causal_mask(config=self.text.config, inputs_embeds=x, attention_mask=layout.attention_mask,
                                  cache=None)
        hook = deep_splice(layout.ctx_positions, deep_prompts)
        for index, layer in enumerate(self.text.encoder.layers):
            x = run_hf_layer(layer, hook(index, x), mask, is_causal=True)
        x = self.text.final_layer_norm(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eos_positions(self.text, layout.ids)]
        return self.hf.text_projection(pooled)


class HFClipVisionEncoder(PromptVisionEncoder):
    """transformers ``CLIPVisionModel`` (embeddings, pre_layrnorm, encoder.layers, CLS, post_layernorm)."""

    def __init__(self, backbone: Backbone, method: str):
        self.hf = backbone.model
        self.vision = self.hf.vision_model
        self.width = int(self.vision.config.hidden_size)
        self.num_layers = len(self.vision.encoder.layers)

    def encode(self, images: torch.Tensor, first: torch.Tensor | None = None,
               deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        self._check(first, deep_prompts)
        x = self.vision.embeddings(images)
        count = 0
        if first is not None:
            count = first.shape[0]
            x = append_prompts(x, first)
        x = self.vision.pre_layrnorm(x)
        hook = replace_last_prompts(count, deep_prompts)
        for index, layer in enumerate(self.vision.encoder.layers):
            x = run_hf_layer(layer, hook(index, x), None)
        pooled = self.vision.post_layernorm(x[:, 0])
        return self.hf.visual_projection(pooled)


class SiglipTextEncoder(HFClipTextEncoder):
    """transformers SigLIP / SigLIP 2 text tower: bidirectional, no attention mask (trained on
    max-length padding), final norm, the last position pooled through ``head``."""

    def encode(self, layout: PromptLayout, ctx: torch.Tensor, deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        self._check_depth(deep_prompts)
        x = splice(self.token_embeddings(layout.ids), layout.ctx_positions, ctx)
        x = self.text.embeddings(inputs_embeds=x)
        hook = deep_splice(layout.ctx_positions, deep_prompts)
        for index, layer in enumerate(self.text.encoder.layers):
            x = run_hf_layer(layer, hook(index, x), None)
        return self.text.head(self.text.final_layer_norm(x)[:, -1])


class SiglipVisionEncoder(PromptVisionEncoder):
    """transformers SigLIP image tower: embeddings, encoder.layers, post_layernorm, attention-pooling head.

    The prompts are dropped before the final norm and the head, so the pooled feature attends to
    image tokens only (as MaPLe drops them before CLIP's pooling).
    """

    def __init__(self, backbone: Backbone, method: str):
        self.backbone = backbone
        self.vision = backbone.model.vision_model
        if getattr(self.vision, "head", None) is None:
            raise NotImplementedError(f"method {method!r}: vision prompts need SigLIP's attention-pooling head")
        self.width = int(self.vision.config.hidden_size)
        self.num_layers = len(self.vision.encoder.layers)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with positions (B, N, W)."""
        return self.vision.embeddings(images)

    def encode(self, images: torch.Tensor, first: torch.Tensor | None = None,
               deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        self._check(first, deep_prompts)
        x = self.embed(images)
        count = 0
        if first is not None:
            count = first.shape[0]
            x = append_prompts(x, first)
        hook = replace_last_prompts(count, deep_prompts)
        for index, layer in enumerate(self.vision.encoder.layers):
            x = run_hf_layer(layer, hook(index, x), None)
        if count:
            x = x[:, :-count]
        return self.vision.head(self.vision.post_layernorm(x))


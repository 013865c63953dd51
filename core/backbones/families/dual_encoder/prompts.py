"""Prompt-aware towers of the dual encoder (``kind: dual_encoder`` / ``compact_base``).

Text: a BERT-like Hugging Face encoder. A prompt "[CLS] v1 v2 v3 v4 red . [SEP]" has its context
word embeddings replaced by learned vectors and goes through the encoder's own embedding layer
(``inputs_embeds``: position and token-type embeddings and the LayerNorm apply to the prompt's
tokens exactly as for token ids; RoBERTa-style padding positions differ, but padding is masked),
its layers, the backbone's pooling (mean over the attention mask, or [CLS]) and its
``text_projection``. Image: a timm ``VisionTransformer`` or an open_clip visual, then the
backbone's ``image_projection``; MaPLe's prompt tokens ride along as for the CLIP towers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from open_clip.transformer import VisionTransformer as OpenClipViT
from timm.models.vision_transformer import VisionTransformer
from transformers.masking_utils import create_bidirectional_mask

from ...base import Backbone, pool_text
from ...prompting import (PromptLayout, PromptTextEncoder, PromptTokenizer, PromptVisionEncoder, append_prompts,
                          deep_splice, replace_last_prompts, run_hf_layer, special_token_frame, splice)
from ..open_clip.prompts import OpenClipVisionEncoder

BERT_LIKE_TYPES = ("bert", "roberta", "xlm-roberta")
"""``config.model_type`` of text encoders with BERT's layout (``embeddings`` taking ``inputs_embeds``,
absolute positions, ``encoder.layer``) whose layer-by-layer forward here equals their own."""


class BertLikeTextEncoder(PromptTextEncoder):
    """A dual encoder's BERT-like text tower, its pooling and its ``text_projection``."""

    def __init__(self, backbone: Backbone, method: str):
        text = backbone.text
        settings = backbone.config_dict()
        model_type = getattr(text.config, "model_type", type(text).__name__)
        if model_type not in BERT_LIKE_TYPES or getattr(text.config, "is_decoder", False):
            raise NotImplementedError(
                f"method {method!r}: prompt learning on a dual encoder supports BERT-like text encoders "
                f"(model_type {', '.join(BERT_LIKE_TYPES)}); model.text {settings.get('text')!r} is a "
                f"{model_type!r} {type(text).__name__}")
        self.text = text
        self.projection = backbone.text_projection
        self.pooling = settings["text_pooling"]
        wrapper = backbone.text_tokenizer
        tokenizer = wrapper.tokenizer
        prefix, suffix = special_token_frame(tokenizer)
        self.width = int(text.config.hidden_size)
        self.num_layers = len(text.encoder.layer)
        self.tokenizer = PromptTokenizer(
            encode=lambda words: tokenizer(words, add_special_tokens=False)["input_ids"], prefix=prefix,
            suffix=suffix, max_length=int(wrapper.max_length),
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            pad_to_max=bool(wrapper.pad_to_max),
            placeholder_id=next(i for i in range(4) if i not in (*prefix, *suffix)))

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        embedding = self.text.embeddings.word_embeddings
        return embedding(ids.to(embedding.weight.device))

    def encode(self, layout: PromptLayout, ctx: torch.Tensor,
               deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        self._check_depth(deep_prompts)
        x = splice(self.token_embeddings(layout.ids), layout.ctx_positions, ctx)
        x = self.text.embeddings(inputs_embeds=x)
        mask = create_bidirectional_mask(config=self.text.config, inputs_embeds=x,
                                         attention_mask=layout.attention_mask)
        hook = deep_splice(layout.ctx_positions, deep_prompts)
        for index, layer in enumerate(self.text.encoder.layer):
            x = run_hf_layer(layer, hook(index, x), mask)
        return self.projection(pool_text(x, layout.attention_mask, self.pooling))


class TimmVisionEncoder(PromptVisionEncoder):
    """timm ``VisionTransformer`` (patch_embed, _pos_embed, norm_pre, blocks, norm, forward_head)."""

    def __init__(self, trunk: nn.Module, method: str):
        if not isinstance(trunk, VisionTransformer):
            raise NotImplementedError(f"method {method!r}: vision prompts on a timm image tower need a timm "
                                      f"VisionTransformer; this model's is a {type(trunk).__name__}")
        self.trunk = trunk
        self.width = int(trunk.embed_dim)
        self.num_layers = len(trunk.blocks)

    def encode(self, images: torch.Tensor, first: torch.Tensor | None = None,
               deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        self._check(first, deep_prompts)
        trunk = self.trunk
        x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))
        count = 0
        if first is not None:  # norm_pre is per token: the prompts get it as the image tokens did
            count = first.shape[0]
            x = append_prompts(x, trunk.norm_pre(first.to(x.dtype)))
        hook = replace_last_prompts(count, deep_prompts)
        for index, block in enumerate(trunk.blocks):
            x = hook(index, x)
            if trunk.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if count:
            x = x[:, :-count]
        return trunk.forward_head(trunk.norm(x))


class DualEncoderVisionEncoder(PromptVisionEncoder):
    """A dual encoder's image tower (timm ViT or open_clip visual) and its ``image_projection``."""

    def __init__(self, backbone: Backbone, method: str):
        trunk = backbone.vision.trunk
        if isinstance(trunk, OpenClipViT):
            self.tower: PromptVisionEncoder = OpenClipVisionEncoder(trunk, method)
        else:
            self.tower = TimmVisionEncoder(trunk, method)
        self.projection = backbone.image_projection
        self.width = self.tower.width
        self.num_layers = self.tower.num_layers

    def encode(self, images: torch.Tensor, first: torch.Tensor | None = None,
               deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        return self.projection(self.tower.encode(images, first, deep_prompts))

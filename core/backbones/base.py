"""The one small interface every backbone implements.

A backbone is a ``torch.nn.Module`` with an image tower and a text tower whose outputs live in one
embedding space. Everything above this layer (losses, the training loop, adaptation methods,
evaluation, export) talks to backbones only through this interface, so an open_clip model, a
Hugging Face CLIP/SigLIP and a dual encoder are interchangeable.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PreprocessConfig:
    """Image preprocessing that belongs to a set of weights (it travels with them).

    Attributes:
        image_size: side of the square input in pixels.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after the mean.
        interpolation: resize filter, ``"bicubic"`` or ``"bilinear"``.
        resize_mode: ``"shortest"`` (resize the short side, centre-crop) or ``"squash"``
            (resize both sides to ``image_size``, ignoring the aspect ratio).
        reader: empty for images decoded as RGB (or grey) by PIL; else ``{name: <reader>, ...}``
            naming an image reader registered with ``core.data.transforms.register_image_reader``
            (e.g. ``geotiff`` for multispectral bands): it returns a ``(channels, H, W)`` float
            tensor in the data's own units, and ``mean``/``std`` are in those units. Omitted
            from ``to_dict()`` when empty.
    """

    image_size: int = 224
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    reader: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if len(self.mean) != len(self.std):
            raise ValueError(f"preprocess mean has {len(self.mean)} channels but std has {len(self.std)}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"preprocess interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"preprocess resize_mode must be 'shortest' or 'squash', got {self.resize_mode!r}")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        values = {**asdict(self), "mean": list(self.mean), "std": list(self.std)}
        if not self.reader:
            del values["reader"]  # RGB preprocessing keeps its established layout
        return values


Tokens = dict[str, torch.Tensor]

class HFTokenize:
    """Picklable wrapper of a Hugging Face tokenizer returning the kit's token dict."""

    def __init__(self, tokenizer: Any, max_length: int, pad_to_max: bool = False, keys: tuple[str, ...] = ("input_ids", "attention_mask")):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_max = pad_to_max
        self.keys = keys

    def __call__(self, texts: list[str]) -> Tokens:
        encoded = self.tokenizer(list(texts), padding="max_length" if self.pad_to_max else True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        return {key: encoded[key] for key in self.keys if key in encoded}


def set_hf_checkpointing(model: nn.Module, enable: bool) -> None:
    """Activation checkpointing of a transformers model, on old and new transformers alike."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enable:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


# Parameter-name fragments that mark a tower's input stage (before its first block).
EMBEDDING_HINTS = ("embed", "conv1", "class_embedding", "positional", "ln_pre", "pre_layrnorm",
                   "cls_token", "pos_embed", "reg_token", "norm_pre")


class Backbone(nn.Module):
    """Base class: an image tower and a text tower projecting into one embedding space.

    Subclasses set ``self.preprocess``, ``self.logit_scale`` (a parameter in log space),
    optionally ``self.logit_bias`` (SigLIP), and implement the ``_image_features`` /
    ``_text_features`` hooks plus ``tokenize``. ``tower_prefixes`` and ``block_prefixes`` say
    which parameters form the image and text towers and their transformer blocks, so locking,
    "unlock the last N blocks" and LoRA presets mean the same thing on every backbone.
    """

    kind: str = "base"
    preprocess: PreprocessConfig
    logit_scale: nn.Parameter
    logit_bias: nn.Parameter | None = None

    # --- hooks for subclasses -------------------------------------------------------------
    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, tokens: Tokens) -> torch.Tensor:
        raise NotImplementedError

    # A picklable callable ``list[str] -> Tokens``; data-loader workers get this, not the model.
    text_tokenizer: Callable[[list[str]], Tokens]

    def tokenize(self, texts: list[str]) -> Tokens:
        """Turn a list of strings into the tensors ``encode_text`` takes (always a dict)."""
        return self.text_tokenizer(list(texts))

    # Subclasses fill these: parameter-name prefixes of each tower and of its block list.
    tower_prefixes: dict[str, tuple[str, ...]] = {}
    block_prefixes: dict[str, str] = {}

    def adopt_identity(self, inner: "Backbone", attribute: str) -> None:
        """Make a wrapper that holds ``inner`` as ``self.<attribute>`` look like it: same kind,
        preprocessing and tokenizer, tower and block prefixes re-rooted under ``attribute``."""
        self.kind = inner.kind
        self.preprocess = inner.preprocess
        self.text_tokenizer = inner.text_tokenizer
        self.tower_prefixes = {tower: tuple(f"{attribute}.{prefix}" for prefix in prefixes)
                               for tower, prefixes in inner.tower_prefixes.items()}
        self.block_prefixes = {tower: f"{attribute}.{prefix}" for tower, prefix in inner.block_prefixes.items()}

    def tower_parameter_groups(self, tower: str) -> list[list[str]]:
        """Parameter names of ``tower`` grouped input to output: [embedding, block 0, ..., head].

        "Unlock the last N blocks" of a locked tower means: the last N block groups plus the head
        group (final norm, pooling, projection), the same rule open_clip's locking uses.
        """
        if tower not in self.tower_prefixes:
            raise ValueError(f"tower must be one of {sorted(self.tower_prefixes)}, got {tower!r}")
        prefixes = self.tower_prefixes[tower]
        block_re = re.compile(rf"^{re.escape(self.block_prefixes[tower])}(\d+)\.")
        embedding: list[str] = []
        blocks: dict[int, list[str]] = {}
        head: list[str] = []
        for name, _ in self.named_parameters():
            if not name.startswith(prefixes):
                continue
            match = block_re.match(name)
            if match:
                blocks.setdefault(int(match.group(1)), []).append(name)
            elif any(hint in name for hint in EMBEDDING_HINTS):
                embedding.append(name)
            else:
                head.append(name)
        return [embedding, *(blocks[i] for i in sorted(blocks)), head]

    def tower_parameter_names(self, tower: str) -> list[str]:
        return [name for group in self.tower_parameter_groups(tower) for name in group]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass to save memory."""
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        """What is needed to rebuild this backbone (saved with every run and export)."""
        raise NotImplementedError

    # --- shared behaviour ------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self._image_features(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tokens, normalize: bool = True) -> torch.Tensor:
        features = self._text_features(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: Tokens | None,
                text_features: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """Normalised features of both towers; ``text_features`` given = a frozen text tower's cache."""
        return {
            "image_features": self.encode_image(images),
            "text_features": F.normalize(text_features, dim=-1) if text_features is not None else self.encode_text(tokens),
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
        }

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def patch_embedding_owner(backbone: Backbone) -> tuple[nn.Module, str]:
    """``(module, attribute)`` holding the image tower's first convolution."""
    model = getattr(backbone, "model", None)
    if model is not None and hasattr(getattr(model, "visual", None), "conv1"):  # open_clip ViT
        return model.visual, "conv1"
    if model is not None and hasattr(model, "vision_model"):  # HF CLIP / SigLIP
        return model.vision_model.embeddings, "patch_embedding"
    trunk = getattr(getattr(backbone, "vision", None), "trunk", None)
    if trunk is not None and hasattr(getattr(trunk, "patch_embed", None), "proj"):  # dual encoder, timm ViT
        return trunk.patch_embed, "proj"
    if trunk is not None and hasattr(trunk, "conv1"):  # dual encoder, open_clip visual
        return trunk, "conv1"
    raise ValueError(f"cannot find the patch-embedding convolution of a {type(backbone).__name__} "
                     f"(kind {backbone.kind!r}); supported: open_clip ViTs, HF CLIP/SigLIP, dual encoders with a ViT")

"""The one interface every backbone family implements.

A backbone is a ``torch.nn.Module`` with an image tower and a text tower whose outputs live in one
embedding space. Each family (open_clip, Hugging Face CLIP/SigLIP, SigLIP 2, the dual encoder)
lives in one package under ``core/backbones/families/`` and subclasses :class:`Backbone`;
everything above this layer (losses, the training loop, adaptation methods, evaluation, export,
the zero-shot API) asks this interface and never tests a family's class. What a family provides:

- pooled embeddings: ``_image_features`` / ``_text_features`` (``encode_image`` / ``encode_text``
  normalise them);
- token-level features: ``encode_image_tokens`` / ``encode_text_tokens`` (:class:`TokenFeatures`:
  final-layer tokens in the joint embedding space, their mask, and the pooled feature);
- tokenisation (``tokenize``) and preprocessing (``preprocess``, travelling with the weights);
- tower layout: ``tower_prefixes`` / ``block_prefixes`` (locking, "last N blocks", layer-wise decay);
- prompt learning: ``prompt_text_encoder`` / ``prompt_vision_encoder`` (CoOp, CoCoOp, MaPLe);
- LoRA: ``lora_preset(tower)`` (which Linear layers ``targets: [attention, mlp]`` mean);
- input adaptation: ``patch_embedding()`` (the first convolution, widened for multispectral bands);
- persistence: ``config_dict`` (rebuild), ``export_formats`` + ``write_export`` (folders other
  tools load) and ``config_from_folder`` (recognise such a folder when loading).

See docs/extending.md ("add a backbone family").
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..encode import model_device

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


@dataclass
class TokenFeatures:
    """Final-layer tokens of one tower in the joint embedding space.

    Attributes:
        tokens: (B, N, D) tokens after the tower's final norm and projection into the embedding
            space (not normalised); for the image tower these include the class token where the
            family has one, for the text tower every position (padding included, masked out).
        mask: (B, N) bool, True for real tokens, False for padding.
        pooled: (B, D) the tower's pooled feature, equal to ``encode_image`` / ``encode_text`` with
            ``normalize=False``; families that pool by choosing or averaging tokens (class token,
            end-of-text token, mean over real tokens) derive it from ``tokens`` (``pooling`` says how).
        pooling: how ``pooled`` relates to ``tokens``: ``first`` (class token), ``last`` (last
            position), ``eos`` (the end-of-text position of each row: ``pool_index``), ``mean``
            (masked mean), or ``head`` (an attention-pooling head: not a function of the projected
            tokens alone).
        pool_index: (B,) the position pooled per row for ``eos``; None otherwise.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor
    pooling: str
    pool_index: torch.Tensor | None = None


@dataclass(frozen=True)
class TowerPreset:
    """Which Linear layers of one transformer block LoRA's ``targets`` mean, for one tower.

    Attributes:
        family: name of the block architecture (``open_clip``, ``hf_clip``, ``timm_vit``, ``bert``).
        attention: Linear layers of the attention (query, key, value, output projections),
            relative to one block.
        mlp: Linear layers of the MLP.
        split_attention: path of an ``nn.MultiheadAttention`` that must first be split into
            separate projections (open_clip); empty when the attention already has Linear layers.
    """

    family: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    split_attention: str = ""


HF_CLIP_BLOCK = TowerPreset("hf_clip", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
                            ("mlp.fc1", "mlp.fc2"))
"""The encoder layer of transformers' CLIP, SigLIP and SigLIP 2 towers."""


def pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Sentence pooling: [CLS] (``cls``) or the mean over real tokens (``mean``, sentence-transformers)."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-6)


def require_rgb(preprocess: PreprocessConfig, fmt: str) -> None:
    """open_clip and transformers preprocessing feed 3-channel RGB images."""
    if preprocess.channels != 3:
        raise ValueError(f"the run's preprocessing has {preprocess.channels} channel(s) (mean {list(preprocess.mean)}); "
                         f"the {fmt!r} format only describes 3-channel RGB input; export a multispectral run with "
                         f"--format adapter")


def all_tokens_mask(tokens: torch.Tensor) -> torch.Tensor:
    """A (B, N) mask marking every token of ``tokens`` (B, N, D) as real."""
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

class HFTokenize:
    """Picklable wrapper of a Hugging Face tokenizer returning the kit's token dict."""

    def __init__(self, tokenizer: Any, max_length: int, pad_to_max: bool = False, keys: tuple[str, ...] = ("input_ids", "attention_mask")):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_max = pad_to_max
        self.keys = keys

    def __call__(self, texts: list[str]) -> Tokens:
        # the mask is always asked for (a tokenizer saved with model_input_names=["input_ids"], as
        # SigLIP's are, would leave it out): FILIP and token features need the padding marked even
        # where the model itself attends to the padding
        encoded = self.tokenizer(list(texts), padding="max_length" if self.pad_to_max else True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt", return_attention_mask=True)
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

    @property
    def token_merging_refusal(self) -> str | None:
        """Why the image tower's tokens must not be merged (None: they may). A wrapper that puts
        tokens of its own into the image sequence (MaPLe's vision prompts) says so here."""
        return None

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

    # --- the rest of the family interface (defaults: "not supported", with the reason) --------
    export_formats: tuple[str, ...] = ()
    """Full export formats this family writes (``adapter`` fits every family and is not listed)."""

    def encode_image_tokens(self, images: torch.Tensor) -> TokenFeatures:
        """Final-layer image tokens in the embedding space (see :class:`TokenFeatures`)."""
        raise NotImplementedError(f"model.kind {self.kind!r} does not expose image tokens")

    def encode_text_tokens(self, tokens: Tokens) -> TokenFeatures:
        """Final-layer text tokens in the embedding space (see :class:`TokenFeatures`)."""
        raise NotImplementedError(f"model.kind {self.kind!r} does not expose text tokens")

    def prompt_text_encoder(self, method: str) -> Any:
        """The frozen text tower with learned-prompt slots (a ``prompting.PromptTextEncoder``)."""
        raise NotImplementedError(f"method {method!r}: prompt learning needs a text transformer whose input words it can "
                                  f"replace; model.kind {self.kind!r} ({type(self).__name__}) provides none")

    def prompt_vision_encoder(self, method: str) -> Any:
        """The frozen image tower with prompt tokens (a ``prompting.PromptVisionEncoder``)."""
        raise NotImplementedError(f"method {method!r}: vision prompts are not supported on model.kind {self.kind!r}")

    def lora_preset(self, tower: str) -> TowerPreset:
        """The Linear layers LoRA's ``targets`` mean in one block of ``tower``."""
        raise NotImplementedError(f"LoRA: model.kind {self.kind!r} has no preset for its {tower} tower; "
                                  "name the layers in method.target_modules")

    def patch_embedding(self) -> tuple[nn.Module, str]:
        """``(module, attribute)`` holding the image tower's first convolution (multispectral input)."""
        raise ValueError(f"cannot find the patch-embedding convolution of model.kind {self.kind!r}")

    def write_export(self, fmt: str, folder: Path, trained_names: list[str]) -> None:
        """Write this (plain, merged) backbone as ``fmt`` (one of ``export_formats``) into ``folder``;
        ``trained_names`` lists the parameters the run trained."""
        raise ValueError(f"model.kind {self.kind!r} writes no {fmt!r} export")

    @classmethod
    def config_from_folder(cls, folder: Path) -> Any:
        """The ``ModelConfig`` that loads ``folder`` if it holds this family's export layout, else None."""
        return None

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

    def forward(self, images: torch.Tensor, tokens: Tokens | None, text_features: torch.Tensor | None = None,
                with_tokens: bool = False) -> dict[str, torch.Tensor | None]:
        """Normalised features of both towers; ``text_features`` given = a frozen text tower's cache.

        ``with_tokens`` adds each tower's final-layer tokens, normalised per token, with their
        masks (``image_tokens``, ``image_token_mask``, ``text_tokens``, ``text_token_mask``) from the
        same forward pass (token-level losses such as FILIP).
        """
        out: dict[str, torch.Tensor | None] = {"logit_scale": self.logit_scale.exp(), "logit_bias": self.logit_bias}
        if not with_tokens:
            out["image_features"] = self.encode_image(images)
            out["text_features"] = (F.normalize(text_features, dim=-1) if text_features is not None
                                    else self.encode_text(tokens))
            return out
        if text_features is not None:
            raise ValueError("token-level features need the text tower; a cached text tower gives only pooled features")
        image, text = self.encode_image_tokens(images), self.encode_text_tokens(tokens)
        out.update(image_features=F.normalize(image.pooled, dim=-1), text_features=F.normalize(text.pooled, dim=-1),
                   image_tokens=F.normalize(image.tokens, dim=-1), image_token_mask=image.mask,
                   text_tokens=F.normalize(text.tokens, dim=-1), text_token_mask=text.mask)
        return out

    @property
    def device(self) -> torch.device:
        return model_device(self)


class WrappedModelTemperature:
    """Mixin for backbones wrapping a library model ``self.model`` that holds the temperature
    (``logit_scale``) and, for SigLIP-style models, the ``logit_bias``; list it before ``Backbone``."""

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return getattr(self.model, "logit_bias", None)


def tower_blocks(model: Backbone, tower: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each transformer block of ``tower``, in order."""
    prefix = model.block_prefixes[tower]
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)$")
    found = [(int(m.group(1)), name, module) for name, module in model.named_modules() if (m := pattern.match(name))]
    return [(name, module) for _, name, module in sorted(found, key=lambda item: item[0])]

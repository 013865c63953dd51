"""The ``method: {name: lora}`` recipe section."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..base import MethodConfig

TOWERS = ("image", "text")
TARGETS = ("attention", "mlp")


@dataclass
class LoraConfig(MethodConfig):
    """Low-rank adapters (LoRA, optionally DoRA) on the transformer blocks of one or both towers, via peft.

    The backbone stays frozen; each targeted Linear layer ``W`` becomes
    ``W + (alpha / rank) * B @ A`` with ``B`` initialised to zero, so training starts from the base
    model exactly. Only the adapters (and optionally the temperature) are trained and saved.

    Attributes:
        towers: towers whose transformer blocks get adapters: ``[image, text]``, ``[image]`` or ``[text]``.
        targets: which layers of each block: ``attention`` (query, key, value and output
            projections), ``mlp`` (both MLP layers) or both. A per-family preset maps them to module
            names: open_clip ``attn`` (split into ``q_proj``/``k_proj``/``v_proj``/``out_proj``) and
            ``mlp.c_fc``/``mlp.c_proj``; Hugging Face CLIP/SigLIP ``self_attn.{q,k,v,out}_proj`` and
            ``mlp.fc1``/``mlp.fc2``; timm ViT ``attn.qkv``/``attn.proj`` and ``mlp.fc1``/``mlp.fc2``;
            BERT-like text encoders ``attention.self.{query,key,value}``, ``attention.output.dense``
            and ``intermediate.dense``/``output.dense``.
        rank: rank r of the update ``B @ A``.
        alpha: scaling numerator; the update is multiplied by ``alpha / rank``.
        dropout: dropout on the adapter's input during training (0 = off).
        dora: weight-decomposed LoRA (DoRA): also learn a per-output-channel magnitude.
        merge: also write the adapters merged into the backbone weights at the end of the run
            (``RUN/model/merged.safetensors``, a full backbone state dict usable as ``model.weights``).
            The run's ``trainable.safetensors`` always holds just the adapters;
            ``domainclip.core.export.merge.merge_run(RUN)`` merges any finished run afterwards.
        target_modules: explicit module names that replace the preset (each matches a module whose
            name equals it or ends with ``.NAME``, e.g. ``attn.q_proj`` or ``mlp.c_fc``); only Linear
            layers inside the chosen towers are matched, and every entry must match one.
        train_logit_scale: also learn the temperature (and SigLIP bias).
        train_patch_embedding: also train the image tower's first convolution (the patch
            embedding) in full, saved beside the adapters. Use it with a multispectral
            ``model.input``: otherwise the bands added to an RGB tower keep their initial filters.
    """

    name: str = "lora"
    towers: list[str] = field(default_factory=lambda: ["image", "text"])
    targets: list[str] = field(default_factory=lambda: ["attention", "mlp"])
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    dora: bool = False
    merge: bool = False
    target_modules: list[str] = field(default_factory=list)
    train_logit_scale: bool = False
    train_patch_embedding: bool = False

    def __post_init__(self) -> None:
        _check_choices("method.towers", self.towers, TOWERS)
        _check_choices("method.targets", self.targets, TARGETS)
        if self.rank < 1:
            raise ValueError(f"method.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"method.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"method.dropout must be in [0, 1), got {self.dropout}")
        empty = [entry for entry in self.target_modules if not str(entry).strip(". ")]
        if empty:
            raise ValueError(f"method.target_modules has empty entries: {self.target_modules}")


def _check_choices(key: str, values: list[str], valid: tuple[str, ...]) -> None:
    if not values:
        raise ValueError(f"{key} must name at least one of {list(valid)}")
    unknown = [value for value in values if value not in valid]
    if unknown:
        raise ValueError(f"{key}: {unknown} not in {list(valid)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{key} lists a value twice: {values}")

"""Config sections of the prompt-learning methods (``method: {name: coop | cocoop | maple}``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig

POSITIONS = ("end", "middle", "front")


def _check_context(name: str, n_ctx: int, ctx_init: str) -> None:
    if n_ctx < 0:
        raise ValueError(f"method.n_ctx must be >= 0 (0 = as many as ctx_init has tokens), got {n_ctx}")
    if n_ctx == 0 and not ctx_init.strip():
        raise ValueError(f"method {name!r}: n_ctx=0 means 'as many context tokens as ctx_init has', "
                         "but method.ctx_init is empty; set n_ctx > 0 or give ctx_init")


@dataclass
class CoOpConfig(MethodConfig):
    """CoOp: learn the context words of the class prompt ("X X X X {class}.") with both towers frozen.

    Trained with cross-entropy over the training classes (the recipe's ``loss`` section is not
    used); evaluation classifies with the learned prompts for any class names (base-to-novel).

    Attributes:
        n_ctx: number of learned context vectors; 0 = as many as ``ctx_init`` has tokens.
        ctx_init: initialise the context from the token embeddings of these words ("a photo of
            a"); with ``n_ctx`` smaller than its token count only the first ``n_ctx`` tokens are
            learned and the rest stay fixed words before the class name (needs ``position: end``).
            Empty = random N(0, 0.02) context.
        class_specific: one context per training class (CSC) instead of one shared by all
            classes; class names not seen in training get the mean of the learned contexts.
        position: where the class name goes: ``end`` ("X X X X {class}."), ``middle``
            ("X X {class} X X.") or ``front`` ("{class} X X X X.").
    """

    name: str = "coop"
    n_ctx: int = 16
    ctx_init: str = ""
    class_specific: bool = False
    position: str = "end"

    def __post_init__(self) -> None:
        _check_context(self.name, self.n_ctx, self.ctx_init)
        if self.position not in POSITIONS:
            raise ValueError(f"method.position must be one of {POSITIONS}, got {self.position!r}")


@dataclass
class CoCoOpConfig(MethodConfig):
    """CoCoOp: CoOp's shared context plus an image-conditioned shift from a small meta-net.

    Every image gets its own prompts: context + meta_net(image features). It generalises better
    to unseen classes than CoOp but runs the text tower once per image and class in every step
    (the paper trains with batch size 1): keep ``data.batch_size`` x classes small.

    Attributes:
        n_ctx: number of learned context vectors; 0 = as many as ``ctx_init`` has tokens.
        ctx_init: initialise the context from these words' token embeddings; with ``n_ctx``
            smaller than its token count the remaining tokens stay fixed words. Empty = random
            N(0, 0.02) context.
        meta_hidden_ratio: the meta-net is Linear(D, D // ratio), ReLU, Linear(D // ratio, W)
            for image embedding size D and text width W (the paper uses 16).
    """

    name: str = "cocoop"
    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    meta_hidden_ratio: int = 16

    def __post_init__(self) -> None:
        _check_context(self.name, self.n_ctx, self.ctx_init)
        if self.meta_hidden_ratio < 1:
            raise ValueError(f"method.meta_hidden_ratio must be >= 1, got {self.meta_hidden_ratio}")


@dataclass
class MaPLeConfig(MethodConfig):
    """MaPLe: deep prompts in both towers, the image prompts coupled to the text prompts.

    Layer 0 of the text tower reads the learned context in place of words; layers 1 to
    ``depth - 1`` get fresh learned text prompts at the same positions. The image tower gets
    ``n_ctx`` extra tokens in the same layers, each a linear function (the coupling) of that
    layer's text prompts. Only prompts and couplings train.

    Attributes:
        n_ctx: number of prompt tokens per layer and tower; 0 = as many as ``ctx_init`` has tokens.
        ctx_init: initialise the layer-0 text context from these words' token embeddings; with
            ``n_ctx`` smaller than its token count the remaining tokens stay fixed words (the
            paper: n_ctx 2 with "a photo of a" learns "a photo" and keeps "of a").
        depth: layers that get prompts, from the first (1 = shallow prompts only); at most the
            number of layers of either tower.
    """

    name: str = "maple"
    n_ctx: int = 2
    ctx_init: str = "a photo of a"
    depth: int = 9

    def __post_init__(self) -> None:
        _check_context(self.name, self.n_ctx, self.ctx_init)
        if self.depth < 1:
            raise ValueError(f"method.depth must be >= 1, got {self.depth}")

"""Contrastive objectives (CLIP InfoNCE and SigLIP sigmoid) that are exact under several processes.

Both losses take L2-normalised ``image_features`` and ``text_features`` of shape (B, D) where row
``i`` of each is a matching pair, the already-exponentiated ``logit_scale``, an optional
``logit_bias`` and optional class ``labels``.

Multi-process scaling (why the numbers below are what they are). Let N be the global batch, W the
number of processes and L the single-process loss on the global batch. Each rank gathers the
features it needs with :func:`~domainclip.core.distributed.gather_with_grad`, whose backward sums
the gradients of all ranks, so rank r's parameters receive the gradient of ``sum_s loss_s`` with
respect to rank r's rows; DDP then divides by W. Both the reported value (averaged over ranks) and
the averaged gradients therefore equal those of L exactly when ``sum_s loss_s = W * L``. With
local rows, rank r returns ``W / N`` times the SUM of its rows' per-example losses (which is the
familiar per-rank mean when ranks hold equal N / W rows, and stays exact when they do not); when
every rank computes the whole global matrix, each returns L itself.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from domainclip.core.config import TaggedConfig, register_tagged
from domainclip.core.distributed import gather_no_grad, gather_with_grad, world_info

__all__ = [
    "LossConfig", "FilipLossConfig", "ClipLoss", "SigLipLoss", "FilipLoss", "LOSSES", "register_loss", "build_loss",
    "loss_inputs", "late_interaction_scores", "paired_late_interaction", "same_class_negatives",
]


@dataclass
class LossConfig(TaggedConfig):
    """Contrastive objective.

    Attributes:
        name: "clip" (InfoNCE, softmax), "siglip" (pairwise sigmoid) or "filip" (token-wise late
            interaction, optionally plus CLIP; see ``loss (name: filip)``).
        label_aware: treat same-class captions in a batch as non-negatives.
        local_loss: clip only: each process computes its own rows against the global batch
            (less memory, same value and gradients) instead of the whole global matrix.
    """

    TAG: ClassVar[str] = "name"
    name: str = "clip"
    label_aware: bool = False
    local_loss: bool = True


LossBuilder = Callable[[LossConfig], nn.Module]
LOSSES: dict[str, LossBuilder] = {}


def register_loss(name: str, config_class: type[LossConfig] = LossConfig) -> Callable[[LossBuilder], LossBuilder]:
    """Decorator on a builder ``cfg -> nn.Module``: make ``loss: {name: NAME}`` use it with ``config_class``.

    A loss module whose class sets ``needs_tokens = True`` receives the token features too
    (see :func:`loss_inputs`).
    """

    def decorator(builder: LossBuilder) -> LossBuilder:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        register_tagged(LossConfig, name)(config_class)
        LOSSES[name] = builder
        return builder

    return decorator


def build_loss(cfg: LossConfig) -> nn.Module:
    """Build the loss module that ``cfg`` describes; raises ValueError for an unknown name."""
    if cfg.name not in LOSSES:
        valid = ", ".join(repr(name) for name in LOSSES)
        close = difflib.get_close_matches(cfg.name, list(LOSSES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown loss name {cfg.name!r} in LossConfig.name; valid names: {valid}{hint}")
    expected = LossConfig.REGISTRY[cfg.name]
    if not isinstance(cfg, expected):
        raise ValueError(f"loss {cfg.name!r} needs a {expected.__name__}, got a {type(cfg).__name__}")
    return LOSSES[cfg.name](cfg)


def loss_inputs(outputs: dict[str, Any], labels: torch.Tensor | None, loss_fn: nn.Module) -> tuple[tuple, dict]:
    """Positional and keyword arguments of ``loss_fn`` from a backbone's forward ``outputs``.

    Token-level losses (``needs_tokens``) also get ``image_tokens``, ``image_token_mask``,
    ``text_tokens`` and ``text_token_mask`` (the backbone's ``forward(..., with_tokens=True)``).
    """
    args = (outputs["image_features"], outputs["text_features"], outputs["logit_scale"], outputs.get("logit_bias"))
    kwargs: dict[str, Any] = {"labels": labels}
    if getattr(loss_fn, "needs_tokens", False):
        missing = [key for key in TOKEN_KEYS if key not in outputs]
        if missing:
            raise ValueError(f"{type(loss_fn).__name__} needs token features but the model's outputs lack {missing}; "
                             "call the backbone with with_tokens=True")
        kwargs.update({key: outputs[key] for key in TOKEN_KEYS})
    return args, kwargs


TOKEN_KEYS = ("image_tokens", "image_token_mask", "text_tokens", "text_token_mask")


def _check_scalar(value: torch.Tensor | float, argument: str, loss_name: str) -> None:
    if torch.is_tensor(value) and value.numel() != 1:
        raise ValueError(
            f"{loss_name}: {argument} must be a scalar (one element), got shape {tuple(value.shape)}"
        )


def _check_inputs(
    loss_name: str,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None,
    labels: torch.Tensor | None,
    label_aware: bool,
) -> None:
    """Raise a clear error for inputs that would silently give a wrong loss."""
    for argument, features in (("image_features", image_features), ("text_features", text_features)):
        if features.dim() != 2:
            raise ValueError(
                f"{loss_name}: {argument} must have shape (B, D), got shape {tuple(features.shape)}"
            )
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"{loss_name}: image_features and text_features must have the same shape (B, D) "
            f"(row i of each is a matching pair), got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    _check_scalar(logit_scale, "logit_scale", loss_name)
    if logit_bias is not None:
        _check_scalar(logit_bias, "logit_bias", loss_name)
    if not label_aware:
        return
    if labels is None:
        raise ValueError(
            f"{loss_name}: label_aware=True needs labels (LongTensor of shape (B,), -1 = unlabelled), "
            f"got labels=None"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError(
            f"{loss_name}: label_aware=True needs integer class labels of shape (B,) (-1 = unlabelled), "
            f"got dtype {labels.dtype} with shape {tuple(labels.shape)}; multi-label (B, L) float "
            f"labels are not supported"
        )
    if labels.shape[0] != image_features.shape[0]:
        raise ValueError(
            f"{loss_name}: labels has {labels.shape[0]} entries but the batch has "
            f"{image_features.shape[0]} image/text pairs"
        )
    if bool((labels < -1).any()):
        raise ValueError(
            f"{loss_name}: labels must be >= 0 or -1 (unlabelled), got values "
            f"{sorted(set(labels[labels < -1].tolist()))}"
        )


def same_class_negatives(
    row_labels: torch.Tensor, column_labels: torch.Tensor, row_offset: int
) -> torch.Tensor:
    """Boolean (rows, columns) mask of same-class pairs that are not the matching pair itself.

    Row ``i`` is matched with column ``row_offset + i``; pairs where either label is -1 are never
    marked.
    """
    same_class = row_labels[:, None] == column_labels[None, :]
    both_labelled = (row_labels[:, None] >= 0) & (column_labels[None, :] >= 0)
    columns = torch.arange(column_labels.shape[0], device=column_labels.device)
    matching_column = row_offset + torch.arange(row_labels.shape[0], device=row_labels.device)
    not_matching_pair = columns[None, :] != matching_column[:, None]
    return same_class & both_labelled & not_matching_pair


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over ``logit_scale * image @ text.T (+ logit_bias)``.

    The value is the mean of the image->text and text->image cross entropies with the matching
    pair as target, over the GLOBAL batch when several processes run (features are gathered with
    gradient, so every process uses all N pairs as negatives).

    Args:
        local_loss: each rank computes only its own n_r rows (images against all texts and texts
            against all images, targets shifted by its row offset) and returns
            ``W / N * (sum of its rows' two cross entropies) / 2``. With False every rank builds
            the full N x N matrix and returns the global loss itself. Both give, after averaging
            the value over ranks and DDP's gradient average, exactly the single-process loss and
            gradients on the global batch (see the module docstring), even with uneven n_r.
        label_aware: captions of the same class in the (global) batch are not negatives: the
            off-diagonal pairs whose labels are equal and >= 0 are removed from the softmax
            denominator (logit set to -inf) in both directions. Label -1 (unlabelled) is never
            masked, so unlabelled pairs behave as in plain CLIP. ``labels`` are ignored when
            False.
    """

    def __init__(self, local_loss: bool = True, label_aware: bool = False) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.label_aware = label_aware

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the scalar loss of this process (see the class docstring for its scaling)."""
        _check_inputs(
            "ClipLoss", image_features, text_features, logit_scale, logit_bias, labels, self.label_aware
        )
        _, world_size = world_info()
        all_images, row_offset = gather_with_grad(image_features)
        all_texts, _ = gather_with_grad(text_features)
        global_size = all_images.shape[0]
        if global_size == 0:
            raise ValueError("ClipLoss: the global batch is empty (0 image/text pairs)")
        all_labels = gather_no_grad(labels)[0] if self.label_aware else None

        if self.local_loss:
            rows_images, rows_texts, rows_labels = image_features, text_features, labels
            scale_to_global = world_size / global_size
        else:
            rows_images, rows_texts, rows_labels = all_images, all_texts, all_labels
            row_offset, scale_to_global = 0, 1.0 / global_size

        not_negative = same_class_negatives(rows_labels, all_labels, row_offset) if self.label_aware else None
        # the scale multiplies the features before the product, as it always has: the same rounding
        summed = _summed_infonce(logit_scale * rows_images @ all_texts.T, logit_scale * rows_texts @ all_images.T,
                                 logit_bias, row_offset, not_negative)
        return summed * (scale_to_global / 2)


def _summed_infonce(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor,
                    logit_bias: torch.Tensor | float | None, row_offset: int,
                    not_negative: torch.Tensor | None) -> torch.Tensor:
    """Sum of both directions' cross entropies of scaled similarity rows (row i's target: column offset + i).

    ``not_negative`` (label-aware) pairs leave the softmax denominators (logit -inf).
    """
    if logit_bias is not None:
        logits_per_image, logits_per_text = logits_per_image + logit_bias, logits_per_text + logit_bias
    if not_negative is not None:
        logits_per_image = logits_per_image.masked_fill(not_negative, float("-inf"))
        logits_per_text = logits_per_text.masked_fill(not_negative, float("-inf"))
    targets = row_offset + torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return F.cross_entropy(logits_per_image, targets, reduction="sum") + F.cross_entropy(
        logits_per_text, targets, reduction="sum")


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al., 2023).

    ``-1/N * sum_i sum_j logsigmoid(z_ij * (logit_scale * <img_i, txt_j> + logit_bias))`` with
    ``z_ij = +1`` for the matching pair and -1 otherwise, i.e. summed over texts and averaged over
    the N images, as open_clip's ``SigLipLoss``. Under W processes each rank gathers the texts with
    gradient, scores its n_r local images against all N texts and returns ``W / N`` times its
    partial sum; the value averaged over ranks and the DDP-averaged gradients then equal the
    single-process ones on the global batch, even with uneven n_r (see the module docstring).

    Args:
        label_aware: off-diagonal pairs whose labels are equal and >= 0 get weight 0 (they are
            neither positives nor negatives); the normalisation stays 1/N. Label -1 is never
            masked. ``labels`` are ignored when False.
    """

    def __init__(self, label_aware: bool = False) -> None:
        super().__init__()
        self.label_aware = label_aware

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the scalar loss of this process (see the class docstring for its scaling)."""
        _check_inputs(
            "SigLipLoss", image_features, text_features, logit_scale, logit_bias, labels, self.label_aware
        )
        _, world_size = world_info()
        all_texts, row_offset = gather_with_grad(text_features)
        global_size = all_texts.shape[0]
        if global_size == 0:
            raise ValueError("SigLipLoss: the global batch is empty (0 image/text pairs)")

        logits = logit_scale * image_features @ all_texts.T
        if logit_bias is not None:
            logits = logits + logit_bias
        local_size = image_features.shape[0]
        local_rows = torch.arange(local_size, device=logits.device)
        signs = -torch.ones_like(logits)
        signs[local_rows, row_offset + local_rows] = 1.0
        pair_losses = -F.logsigmoid(signs * logits)
        if self.label_aware:
            all_labels, _ = gather_no_grad(labels)
            not_negative = same_class_negatives(labels, all_labels, row_offset)
            pair_losses = pair_losses.masked_fill(not_negative, 0.0)
        return pair_losses.sum() * (world_size / global_size)


class OneToKLoss(nn.Module):
    """1-to-K contrastive loss (Nie et al., "Improving the Consistency in Cross-Lingual Cross-Modal
    Retrieval with 1-to-K Contrastive Learning", KDD 2024): one image against its K parallel captions.

    Inputs: normalised ``image_features`` (B, D), ``text_features`` (B, K, D) (caption ``[i, k]``
    describes image ``i`` in language ``k``) and the exponentiated ``logit_scale``.

    * image -> text: for each image ``i`` and language ``k``, a softmax over the positive
      ``[i, k]`` and every caption of the *other* images in *all* languages; the image's other
      K - 1 captions are left out of the denominator (they are positives too), so every language
      is pulled equally and the negatives of all languages compete in one softmax;
    * text -> image: each caption against all B images (its own image is the target).

    The value is the mean of the two directions, each averaged over the B * K pairs. With several
    processes the features are gathered with gradient and scaled as :class:`ClipLoss` with
    ``local_loss`` (exact to the single-process loss on the global batch).
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor | float) -> torch.Tensor:
        if image_features.dim() != 2 or text_features.dim() != 3 or text_features.shape[0] != image_features.shape[0] \
                or text_features.shape[2] != image_features.shape[1]:
            raise ValueError(f"OneToKLoss: expected image_features (B, D) and text_features (B, K, D), got "
                             f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        _check_scalar(logit_scale, "logit_scale", "OneToKLoss")
        local, count, _ = text_features.shape
        _, world_size = world_info()
        all_images, offset = gather_with_grad(image_features)
        all_texts, _ = gather_with_grad(text_features.reshape(local * count, -1))
        total = all_images.shape[0]
        if total == 0:
            raise ValueError("OneToKLoss: the global batch is empty")
        own = offset + torch.arange(local, device=image_features.device)
        owner = torch.arange(total * count, device=image_features.device) // count  # image of each text column
        logits = logit_scale * image_features @ all_texts.T  # (local, total*K)
        positives = logits.view(local, total, count)[torch.arange(local), own]  # (local, K)
        negatives = logits.masked_fill(owner[None, :] == own[:, None], float("-inf")).logsumexp(dim=1, keepdim=True)
        image_to_text = (torch.logaddexp(positives, negatives) - positives).sum()
        text_logits = logit_scale * text_features.reshape(local * count, -1) @ all_images.T  # (local*K, total)
        text_to_image = F.cross_entropy(text_logits, own.repeat_interleave(count), reduction="sum")
        return (image_to_text + text_to_image) * (world_size / (total * count * 2))


@dataclass
class FilipLossConfig(LossConfig):
    """FILIP token-wise late interaction (Yao et al., ICLR 2022), optionally plus the CLIP loss.

    The loss is ``filip_weight * FILIP + clip_weight * CLIP`` (both symmetric InfoNCE; FILIP's
    similarities are the late-interaction scores of the final-layer tokens, CLIP's the dot
    product of the pooled embeddings). ``label_aware`` and ``local_loss`` apply to both terms.

    Attributes:
        clip_weight: weight of the CLIP loss on the pooled embeddings (0 = FILIP alone).
        filip_weight: weight of the late-interaction loss.
        chunk_size: texts scored at once: memory grows as batch x chunk_size x text tokens x
            image tokens instead of batch x batch x text tokens x image tokens (0 = no chunking).
    """

    name: str = "filip"
    clip_weight: float = 1.0
    filip_weight: float = 1.0
    chunk_size: int = 16

    def __post_init__(self) -> None:
        for key in ("clip_weight", "filip_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"loss.{key} must be >= 0, got {getattr(self, key)}")
        if self.filip_weight == 0:
            raise ValueError("loss.filip_weight is 0: use loss.name=clip for the CLIP loss alone")
        if self.chunk_size < 0:
            raise ValueError(f"loss.chunk_size must be >= 0 (0 = no chunking), got {self.chunk_size}")


SCORE_DIRECTIONS = ("both", "image_to_text", "text_to_image")


def late_interaction_scores(
    image_tokens: torch.Tensor,
    image_mask: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    chunk_size: int = 0,
    direction: str = "both",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """FILIP's token-wise similarities of every image with every text.

    ``image_tokens`` (Bi, I, D) and ``text_tokens`` (Bt, T, D) are L2-normalised per token;
    masks are boolean, True for real tokens (each item needs at least one). Returns
    ``(image_to_text, text_to_image)``, each (Bi, Bt) or None when ``direction`` skips it:

    * ``image_to_text[i, j]``: for each real token of image i its best (max) real token of text j,
      averaged over image i's real tokens;
    * ``text_to_image[i, j]``: for each real token of text j its best real token of image i,
      averaged over text j's real tokens.

    Texts are scored ``chunk_size`` at a time (0: all at once), so the largest intermediate is
    (Bi, chunk, I, T); the max keeps only indices for backward, so the graph stays small too.
    """
    if direction not in SCORE_DIRECTIONS:
        raise ValueError(f"direction must be one of {SCORE_DIRECTIONS}, got {direction!r}")
    _check_tokens("image", image_tokens, image_mask)
    _check_tokens("text", text_tokens, text_mask)
    if image_tokens.shape[-1] != text_tokens.shape[-1]:
        raise ValueError(f"image tokens have dim {image_tokens.shape[-1]} but text tokens {text_tokens.shape[-1]}")
    image_mask, text_mask = image_mask.bool(), text_mask.bool()
    image_counts = image_mask.sum(dim=1).to(image_tokens.dtype)  # (Bi,)
    text_counts = text_mask.sum(dim=1).to(text_tokens.dtype)  # (Bt,)
    step = chunk_size if chunk_size > 0 else max(text_tokens.shape[0], 1)
    image_to_text, text_to_image = [], []
    for start in range(0, text_tokens.shape[0], step):
        texts, mask = text_tokens[start:start + step], text_mask[start:start + step]
        tokens = torch.einsum("ikd,jrd->ijkr", image_tokens, texts)  # (Bi, c, I, T)
        if direction != "text_to_image":
            best_word = tokens.masked_fill(~mask[None, :, None, :], float("-inf")).amax(dim=3)  # (Bi, c, I)
            best_word = best_word.masked_fill(~image_mask[:, None, :], 0.0)
            image_to_text.append(best_word.sum(dim=2) / image_counts[:, None])
        if direction != "image_to_text":
            best_patch = tokens.masked_fill(~image_mask[:, None, :, None], float("-inf")).amax(dim=2)  # (Bi, c, T)
            best_patch = best_patch.masked_fill(~mask[None, :, :], 0.0)
            text_to_image.append(best_patch.sum(dim=2) / text_counts[None, start:start + step])
    return (torch.cat(image_to_text, dim=1) if image_to_text else None,
            torch.cat(text_to_image, dim=1) if text_to_image else None)


def paired_late_interaction(image_tokens: torch.Tensor, image_mask: torch.Tensor, text_tokens: torch.Tensor,
                            text_mask: torch.Tensor, direction: str) -> torch.Tensor:
    """The late-interaction score of each aligned pair (image row n with text row n), shape (n,).

    ``direction`` is ``image_to_text`` or ``text_to_image`` (see :func:`late_interaction_scores`,
    whose diagonal this is); retrieval re-ranking scores each query against its own candidates.
    """
    if direction not in SCORE_DIRECTIONS[1:]:
        raise ValueError(f"direction must be one of {SCORE_DIRECTIONS[1:]}, got {direction!r}")
    _check_tokens("image", image_tokens, image_mask)
    _check_tokens("text", text_tokens, text_mask)
    image_mask, text_mask = image_mask.bool(), text_mask.bool()
    tokens = torch.einsum("nkd,nrd->nkr", image_tokens, text_tokens)  # (n, I, T)
    if direction == "image_to_text":
        best = tokens.masked_fill(~text_mask[:, None, :], float("-inf")).amax(dim=2).masked_fill(~image_mask, 0.0)
        return best.sum(dim=1) / image_mask.sum(dim=1).to(best.dtype)
    best = tokens.masked_fill(~image_mask[:, :, None], float("-inf")).amax(dim=1).masked_fill(~text_mask, 0.0)
    return best.sum(dim=1) / text_mask.sum(dim=1).to(best.dtype)


def _check_tokens(tower: str, tokens: torch.Tensor, mask: torch.Tensor) -> None:
    if tokens.dim() != 3:
        raise ValueError(f"{tower} tokens must have shape (B, N, D), got {tuple(tokens.shape)}")
    if mask.shape != tokens.shape[:2]:
        raise ValueError(f"{tower} token mask must have shape {tuple(tokens.shape[:2])} (B, N), got {tuple(mask.shape)}")
    if mask.dtype.is_floating_point:
        raise ValueError(f"{tower} token mask must be boolean (True = real token), got dtype {mask.dtype}")
    if tokens.shape[0] and not bool(mask.bool().any(dim=1).all()):
        empty = (~mask.bool().any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"{tower} items {empty[:5]} have no real token (their mask is all False)")


def _gather_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, int]:
    """Tokens padded to the longest sequence of any process, then gathered (with gradient) with their masks.

    Returns this rank's padded tokens and mask, the gathered ones (rank order) and this rank's row
    offset in them; ranks may hold
    different numbers of items and of tokens (a tokenizer padding to the longest caption).
    """
    lengths, _ = gather_no_grad(torch.tensor([tokens.shape[1]], device=tokens.device))
    extra = int(lengths.max()) - tokens.shape[1]
    if extra:
        tokens = F.pad(tokens, (0, 0, 0, extra))
        mask = F.pad(mask, (0, extra), value=False)
    all_tokens, offset = gather_with_grad(tokens)
    all_mask, _ = gather_no_grad(mask.to(torch.uint8))  # gloo cannot all-gather bool
    return tokens, mask, all_tokens, all_mask.bool(), offset


class FilipLoss(nn.Module):
    """FILIP: symmetric InfoNCE over token-wise late-interaction similarities, plus weighted CLIP.

    Image -> text logits are ``logit_scale * image_to_text`` and text -> image logits
    ``logit_scale * text_to_image`` of :func:`late_interaction_scores` (``+ logit_bias``, which a
    softmax ignores). Under several processes token features are gathered with gradient and the
    value is scaled exactly as :class:`ClipLoss` (``local_loss``: each rank scores its own images
    against all texts and its own texts against all images). The CLIP term on the pooled
    embeddings is :class:`ClipLoss` itself.
    """

    needs_tokens = True

    def __init__(self, clip_weight: float = 1.0, filip_weight: float = 1.0, chunk_size: int = 16,
                 local_loss: bool = True, label_aware: bool = False) -> None:
        super().__init__()
        self.clip_weight, self.filip_weight, self.chunk_size = clip_weight, filip_weight, chunk_size
        self.local_loss, self.label_aware = local_loss, label_aware
        self.clip = ClipLoss(local_loss=local_loss, label_aware=label_aware)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
        labels: torch.Tensor | None = None,
        *,
        image_tokens: torch.Tensor | None = None,
        image_token_mask: torch.Tensor | None = None,
        text_tokens: torch.Tensor | None = None,
        text_token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return this process's share of ``filip_weight * FILIP + clip_weight * CLIP``."""
        if any(t is None for t in (image_tokens, image_token_mask, text_tokens, text_token_mask)):
            raise ValueError("FilipLoss needs image_tokens, image_token_mask, text_tokens and text_token_mask "
                             "(the backbone's forward(..., with_tokens=True))")
        _check_inputs("FilipLoss", image_features, text_features, logit_scale, logit_bias, labels, self.label_aware)
        for tower, tokens in (("image", image_tokens), ("text", text_tokens)):
            if tokens.shape[0] != image_features.shape[0]:
                raise ValueError(f"FilipLoss: {tokens.shape[0]} {tower} token rows for {image_features.shape[0]} pairs")
        loss = self.filip_weight * self.late_interaction_loss(
            image_tokens, image_token_mask, text_tokens, text_token_mask, logit_scale, logit_bias, labels)
        if self.clip_weight:
            loss = loss + self.clip_weight * self.clip(image_features, text_features, logit_scale, logit_bias,
                                                       labels=labels)
        return loss

    def late_interaction_loss(self, image_tokens: torch.Tensor, image_mask: torch.Tensor, text_tokens: torch.Tensor,
                              text_mask: torch.Tensor, logit_scale: torch.Tensor | float,
                              logit_bias: torch.Tensor | float | None = None,
                              labels: torch.Tensor | None = None) -> torch.Tensor:
        """The FILIP term alone (this process's share, scaled as :class:`ClipLoss`)."""
        _, world_size = world_info()
        image_tokens, image_mask, all_images, all_image_mask, row_offset = _gather_tokens(image_tokens, image_mask)
        text_tokens, text_mask, all_texts, all_text_mask, _ = _gather_tokens(text_tokens, text_mask)
        global_size = all_images.shape[0]
        if global_size == 0:
            raise ValueError("FilipLoss: the global batch is empty (0 image/text pairs)")
        all_labels = gather_no_grad(labels)[0] if self.label_aware else None
        if self.local_loss and world_size > 1:
            per_image, _ = late_interaction_scores(image_tokens, image_mask, all_texts, all_text_mask,
                                                   self.chunk_size, "image_to_text")
            _, per_text = late_interaction_scores(all_images, all_image_mask, text_tokens, text_mask,
                                                  self.chunk_size, "text_to_image")
            per_text = per_text.T
            rows_labels, scale_to_global = labels, world_size / global_size
        else:  # every rank scores the whole global batch (one pass gives both directions)
            per_image, per_text = late_interaction_scores(all_images, all_image_mask, all_texts, all_text_mask,
                                                          self.chunk_size, "both")
            per_text = per_text.T
            rows_labels, row_offset, scale_to_global = all_labels, 0, 1.0 / global_size
        not_negative = same_class_negatives(rows_labels, all_labels, row_offset) if self.label_aware else None
        summed = _summed_infonce(logit_scale * per_image, logit_scale * per_text, logit_bias, row_offset, not_negative)
        return summed * (scale_to_global / 2)


@register_loss("clip")
def _build_clip(cfg: LossConfig) -> nn.Module:
    return ClipLoss(local_loss=cfg.local_loss, label_aware=cfg.label_aware)


@register_loss("siglip")
def _build_siglip(cfg: LossConfig) -> nn.Module:
    return SigLipLoss(label_aware=cfg.label_aware)


@register_loss("filip", FilipLossConfig)
def _build_filip(cfg: FilipLossConfig) -> nn.Module:
    return FilipLoss(clip_weight=cfg.clip_weight, filip_weight=cfg.filip_weight, chunk_size=cfg.chunk_size,
                     local_loss=cfg.local_loss, label_aware=cfg.label_aware)

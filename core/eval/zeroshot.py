"""Zero-shot classification with prompt-template ensembles, plus the encoding loops that the
multi-label and retrieval evaluations share.

The classifier follows CLIP (and CLIP_benchmark): every template is filled with every class
name, the prompts are encoded and L2-normalised, averaged per class and normalised again. The
logits are ``100 * image_features @ classifier`` as in CLIP_benchmark; the factor only scales the
logits, so accuracy and recall do not depend on it.
"""
from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from domainclip.core.encode import FrozenEncoder
from domainclip.core.eval.metrics import classification_metrics, deduplicate_by_index
from domainclip.core.eval.groups import GroupEvalConfig, group_metrics
from domainclip.core.eval.tie_refine import TieRefiner

__all__ = [
    "EncodedImages",
    "ZEROSHOT_LOGIT_SCALE",
    "build_zeroshot_classifier",
    "class_prompts",
    "describe_sample",
    "encode_loader_images",
    "encode_texts",
    "evaluate_zeroshot",
    "unwrap_model",
    "zeroshot_logits",
]

ZEROSHOT_LOGIT_SCALE = 100.0
"""Fixed logit scale of CLIP_benchmark; used instead of the model's learned one so results are
comparable across models (it changes no metric)."""

Templates = Sequence[str] | Mapping[str, Sequence[str]]


# --------------------------------------------------------------------------------------------
# prompts and text encoding
# --------------------------------------------------------------------------------------------
def class_prompts(class_names: Sequence[str], templates: Templates) -> list[list[str]]:
    """The prompts of each class, in class order.

    ``templates`` is either a list of templates with a ``{}`` or ``{c}`` placeholder for the
    class name ("a photo of a {}.", CLIP_benchmark's "a photo of a {c}."), or a dict
    ``{class name: [full prompts]}`` of class-specific prompts (CuPL style).
    """
    if len(class_names) == 0:
        raise ValueError("class_names is empty")
    if isinstance(templates, Mapping):
        missing = [name for name in class_names if not templates.get(name)]
        if missing:
            raise ValueError(f"class-specific templates have no prompts for classes {missing}")
        return [[str(prompt) for prompt in templates[name]] for name in class_names]
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError(f"templates must be a non-empty list of strings, got {templates!r}")
    positional_counts = [_count_placeholders(template) for template in templates]
    return [
        [template.format(*[name] * count, c=name) for template, count in zip(templates, positional_counts)]
        for name in class_names
    ]


def _count_placeholders(template: str) -> int:
    """Number of ``{}`` placeholders in a checked template (``{c}`` ones are filled by keyword)."""
    if not isinstance(template, str):
        raise ValueError(f"template {template!r} is not a string")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"template {template!r} is not a valid format string: {error}") from None
    unknown = [name for name in fields if name not in ("", "c")]
    if unknown:
        raise ValueError(
            f"template {template!r} has placeholder(s) {unknown}; use '{{}}' or '{{c}}' for the class name"
        )
    if not fields:
        raise ValueError(f"template {template!r} has no '{{}}' or '{{c}}' placeholder for the class name")
    return fields.count("")


def encode_texts(model: nn.Module | FrozenEncoder, texts: Sequence[str], batch_size: int = 256,
                 precision: str = "auto") -> torch.Tensor:
    """L2-normalised text features (N, D) as float32 on the model's device, in batches.

    Runs through the kit's one encode path (``core/encode.py``: eval mode, no autograd, weights
    held in ``precision``); the model itself is not changed. ``model`` may be a ``FrozenEncoder``
    already built (its precision is used).
    """
    return FrozenEncoder.of(model, precision).encode_texts(texts, batch_size)


def encode_text_tokens(model: nn.Module | FrozenEncoder, texts: Sequence[str], batch_size: int = 256,
                       precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised pooled features (N, D) on the encoder's device plus per-token normalised final-layer
    tokens (N, T, D) float32 and their mask (N, T) bool on the CPU, T = the last column holding a
    real token in any caption (padding beyond it is dropped to save memory)."""
    encoder = FrozenEncoder.of(model, precision)
    if len(texts) == 0:
        raise ValueError("encode_text_tokens got no texts")
    pooled, tokens, masks = [], [], []
    for start in range(0, len(texts), batch_size):
        features, token_rows, mask = encoder.encode_text_tokens(encoder.tokenize(list(texts[start:start + batch_size])))
        last = int(mask.any(dim=0).nonzero().max()) + 1
        pooled.append(features)
        tokens.append(token_rows[:, :last].cpu())
        masks.append(mask[:, :last].cpu())
    width = max(t.shape[1] for t in tokens)
    tokens = [F.pad(t, (0, 0, 0, width - t.shape[1])) for t in tokens]
    masks = [F.pad(m, (0, width - m.shape[1]), value=False) for m in masks]
    return torch.cat(pooled), torch.cat(tokens), torch.cat(masks)


def build_zeroshot_classifier(
    model: nn.Module | FrozenEncoder, class_names: Sequence[str], templates: Templates, batch_size: int = 256,
    precision: str = "fp32",
) -> torch.Tensor:
    """Zero-shot classifier weights (D, C): the normalised mean of each class's prompt features.

    Encodes through :func:`encode_texts` and returns float32 weights on the model's device. The
    default ``precision`` is fp32 even where images are encoded in bf16: the class weights are a
    few prompts encoded once per label set, and fp32 weights keep the order of near-tied classes
    exactly as an all-fp32 run has it (bf16 text features moved a tie of 2e-4 in cosine on the
    bundled sample; bf16 image features moved none).
    """
    prompts = class_prompts(class_names, templates)
    flat_prompts = [prompt for class_prompt_list in prompts for prompt in class_prompt_list]
    prompt_features = encode_texts(model, flat_prompts, batch_size, precision)
    device = prompt_features.device
    prompt_class = torch.repeat_interleave(
        torch.arange(len(prompts), device=device), torch.tensor([len(p) for p in prompts], device=device)
    )
    class_sums = torch.zeros(len(prompts), prompt_features.shape[1], device=device)
    class_sums.index_add_(0, prompt_class, prompt_features)
    # dividing by the prompt count does not change the direction; normalising is the average's job
    return F.normalize(class_sums, dim=-1).T.contiguous()


# --------------------------------------------------------------------------------------------
# image encoding over a loader (shared by zero-shot, multi-label and retrieval evaluation)
# --------------------------------------------------------------------------------------------
@dataclass
class EncodedImages:
    """Image features of a whole loader, sorted by dataset index when batches carry ``indices``.

    Attributes:
        features: (N, D) float32 on the CPU, L2-normalised.
        labels: the batches' ``labels`` concatenated (N,) or (N, L), or None when not asked for.
        indices: (N,) dataset indices, or None when the batches carry none.
        bad: (path, reason) of every item the loader skipped.
        tokens: with ``with_tokens``: (N, I, D) float32 final-layer tokens, normalised per token.
        token_mask: (N, I) bool, True for real tokens.
    """

    features: torch.Tensor
    labels: torch.Tensor | None
    indices: torch.Tensor | None
    bad: list[tuple[str, str]] = field(default_factory=list)
    tokens: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    tie_refinement: dict[str, Any] | None = None
    """With tie refinement: images seen, re-encoded in fp32, the band (``TieRefiner.stats``)."""


def encode_loader_images(
    model: nn.Module | FrozenEncoder, loader: Iterable[Mapping[str, Any]], accelerator: Any = None,
    need_labels: bool = False, precision: str = "auto", with_tokens: bool = False,
    refine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> EncodedImages:
    """Encode every image of ``loader`` (batch dicts with ``images``, ``labels``, ``indices``, ``bad``).

    Batch ``indices`` of -1 mean "index unknown" (webdataset samples with non-numeric keys):
    results then stay in loader order with ``indices`` None. With an ``accelerate.Accelerator``
    on several processes, the results of all processes are
    gathered and the samples a distributed sampler repeats are dropped by their dataset index
    (``gather_for_metrics`` cannot do that here: skipped bad items make the processes' batches
    uneven, which breaks its drop-the-last-remainder rule).

    Images are encoded through the kit's one encode path (``core/encode.py``) with the weights
    held in ``precision`` (or the given ``FrozenEncoder``'s); the accelerator's autocast is not
    used (the weights are cast once instead). ``with_tokens`` also keeps each image's final-layer
    tokens (the pooled feature comes from the same pass). ``refine(images, features) -> features``
    runs on every batch's features before they are kept (``TieRefiner.refine``).
    """
    if refine is not None and with_tokens:
        raise ValueError("tie refinement replaces pooled features only; it cannot be combined with with_tokens")
    encoder = FrozenEncoder.of(model, precision)
    device = encoder.device
    feature_parts, label_parts, index_parts, token_parts, mask_parts = [], [], [], [], []
    bad: list[tuple[str, str]] = []
    carries_indices: bool | None = None
    for batch_number, batch in enumerate(loader):
        images, labels, indices = _unpack_batch(batch, batch_number, need_labels)
        bad.extend(_bad_items(batch, batch_number))
        if carries_indices is None:
            carries_indices = indices is not None
        elif carries_indices != (indices is not None):
            raise ValueError(f"batch {batch_number}: some batches carry 'indices' and others do not")
        if images.shape[0] == 0:
            continue
        if with_tokens:
            features, token_rows, mask = encoder.encode_image_tokens(images)
            token_parts.append(token_rows)
            mask_parts.append(mask.to(torch.uint8))  # gloo gathers no bool
            feature_parts.append(features)
        else:
            features = encoder.encode_image(images)
            feature_parts.append(refine(images, features) if refine is not None else features)
        if need_labels:
            label_parts.append(labels.to(device))
        if indices is not None:
            index_parts.append(indices.to(device=device, dtype=torch.long))

    features = torch.cat(feature_parts) if feature_parts else torch.empty(0, 0, device=device)
    labels = torch.cat(label_parts) if label_parts else None
    indices = torch.cat(index_parts) if index_parts else None
    extra = [torch.cat(token_parts), torch.cat(mask_parts)] if token_parts else []
    distributed = accelerator is not None and accelerator.num_processes > 1
    if indices is not None and (indices < 0).any():
        if distributed:
            raise ValueError(
                f"distributed evaluation needs a dataset index for every sample, but {int((indices < 0).sum())} "
                "have index -1 (e.g. webdataset samples with non-numeric keys)"
            )
        indices = None  # -1 means "index unknown": keep loader order
    if distributed:
        if indices is None:
            raise ValueError(
                "distributed evaluation needs batches with 'indices' to drop the samples a sampler repeats"
            )
        features, labels, indices, extra = _gather_across_processes(accelerator, features, labels, indices, extra)
        bad = _gather_bad_items(bad)
    elif indices is not None:
        _check_unique_indices(indices)
    if indices is not None:  # one row per dataset index, in index order
        indices, features, *rest = deduplicate_by_index(indices, features, *extra, *_present(labels))
        extra, rest = rest[:len(extra)], rest[len(extra):]
        labels = rest[0] if rest else None
    if features.shape[0] == 0:
        raise ValueError(f"the loader yielded no images to evaluate ({len(bad)} items skipped as bad)")
    return EncodedImages(
        features=features.cpu(),
        labels=labels.cpu() if labels is not None else None,
        indices=indices.cpu() if indices is not None else None,
        bad=bad,
        tokens=extra[0].cpu() if extra else None,
        token_mask=extra[1].bool().cpu() if extra else None,
    )


def _present(*tensors: torch.Tensor | None) -> list[torch.Tensor]:
    return [tensor for tensor in tensors if tensor is not None]


def _unpack_batch(
    batch: Mapping[str, Any], batch_number: int, need_labels: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch {batch_number} is a {type(batch).__name__}; expected a dict with an 'images' key")
    images = batch.get("images")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        found = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(
            f"batch {batch_number}: 'images' must be a (B, C, H, W) tensor, got {found} (keys: {sorted(batch)})"
        )
    size = images.shape[0]
    labels = batch.get("labels")
    if need_labels:
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"batch {batch_number} has no 'labels' tensor (keys: {sorted(batch)})")
        if labels.ndim == 0 or labels.shape[0] != size:
            raise ValueError(f"batch {batch_number}: {size} images but labels of shape {tuple(labels.shape)}")
    indices = batch.get("indices")
    if indices is not None:
        indices = torch.as_tensor(indices)
        if indices.shape != (size,):
            raise ValueError(f"batch {batch_number}: {size} images but indices of shape {tuple(indices.shape)}")
    return images, labels if need_labels else None, indices


def _bad_items(batch: Mapping[str, Any], batch_number: int) -> list[tuple[str, str]]:
    items = []
    for item in batch.get("bad") or []:
        if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(f"batch {batch_number}: 'bad' entries must be (path, reason) pairs, got {item!r}")
        items.append((str(item[0]), str(item[1])))
    return items


def _check_unique_indices(indices: torch.Tensor) -> None:
    unique, counts = torch.unique(indices, return_counts=True)
    if (counts > 1).any():
        repeated = unique[counts > 1][:10].tolist()
        raise ValueError(f"the loader yields dataset indices more than once: {repeated}; evaluate each item once")


def _gather_across_processes(
    accelerator: Any, features: torch.Tensor, labels: torch.Tensor | None, indices: torch.Tensor,
    extra: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[torch.Tensor]]:
    """Pad every process's rows to the same count (index -1 marks padding), then gather."""
    def gather(rows: torch.Tensor) -> torch.Tensor:
        return accelerator.gather(accelerator.pad_across_processes(rows, dim=0))

    gathered_indices = accelerator.gather(accelerator.pad_across_processes(indices, dim=0, pad_index=-1))
    gathered_labels = gather(labels) if labels is not None else None
    return gather(features), gathered_labels, gathered_indices, [gather(rows) for rows in extra]


def _gather_bad_items(bad: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """All processes' bad items; a repeated sample's bad item is listed once."""
    from accelerate.utils import gather_object

    return list(dict.fromkeys(tuple(item) for item in gather_object(bad)))


# --------------------------------------------------------------------------------------------
# zero-shot classification
# --------------------------------------------------------------------------------------------
def evaluate_zeroshot(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    class_names: Sequence[str],
    templates: Templates,
    accelerator: Any = None,
    text_batch_size: int = 256,
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    groups: Sequence[str] | None = None,
    group_config: GroupEvalConfig | None = None,
    precision: str = "auto",
    refine_ties: bool = False,
) -> dict[str, Any]:
    """Zero-shot classification metrics of ``model`` on ``loader`` (see ``classification_metrics``).

    Images are encoded with the weights held in ``precision`` (``core/encode.py``), the class
    weights in fp32 (see ``build_zeroshot_classifier``).

    With ``groups`` (the group id of every dataset index) and a ``group_config`` whose
    ``aggregate`` is set, group-level metrics (``core/eval/groups.py``) are added under keys
    prefixed ``group_config.name``.

    ``refine_ties`` re-encodes in fp32 the images whose low-precision top-1 is near a tie
    (``core/eval/tie_refine.py``), so the decisions are fp32's; ``tie_refinement`` in the metrics
    counts them.

    ``logits_fn`` maps normalised image features (N, D) to class logits (N, C) for adaptation
    methods with their own classifier (learned prompts, a linear probe, a Tip-Adapter cache);
    without it the prompt-template ensemble of ``templates`` is the classifier.

    Labels of -1 mean "no label": those images are left out of the metrics and counted in
    ``n_unlabeled`` with their dataset indices in ``unlabeled_indices``. Items the loader
    skipped are counted in ``n_bad`` and listed in ``bad`` as [path, reason].
    """
    class_names = list(class_names)
    logits, encoded, labels = zeroshot_logits(model, loader, class_names, templates, accelerator,
                                              text_batch_size, logits_fn, precision, refine_ties)
    labelled = labels >= 0
    needs_indices = (group_config is not None and group_config.aggregate) or not bool(labelled.all())
    if encoded.indices is None and encoded.bad and needs_indices:
        raise ValueError("the loader skipped bad items but its batches carry no 'indices', so images cannot be "
                         "matched to their groups or dataset positions (the kit's ImageTextDataset provides them)")
    indices = encoded.indices if encoded.indices is not None else torch.arange(labels.shape[0])
    metrics = classification_metrics(logits, labels[labelled], class_names)
    if group_config is not None and group_config.aggregate:
        metrics.update(_group_metrics(logits, labels[labelled], indices[labelled], groups, class_names, group_config))
    metrics["n_unlabeled"] = int((~labelled).sum())
    metrics["unlabeled_indices"] = indices[~labelled].tolist()
    metrics["n_bad"] = len(encoded.bad)
    metrics["bad"] = [list(item) for item in encoded.bad]
    if encoded.tie_refinement is not None:
        metrics["tie_refinement"] = encoded.tie_refinement
    return metrics


def zeroshot_logits(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    class_names: Sequence[str],
    templates: Templates,
    accelerator: Any = None,
    text_batch_size: int = 256,
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    precision: str = "auto",
    refine_ties: bool = False,
) -> tuple[torch.Tensor, EncodedImages, torch.Tensor]:
    """Class logits (L, C) float32 on the CPU of the L labelled images, the encoded images, and the
    checked labels (N,) of all of them (-1: no label): what :func:`evaluate_zeroshot` scores (same
    arguments). A ValueError when no image is labelled."""
    model = unwrap_model(model, accelerator)
    encoder = FrozenEncoder.of(model, precision)
    if logits_fn is None:  # class weights in fp32 (see build_zeroshot_classifier)
        classifier = build_zeroshot_classifier(model, list(class_names), templates, text_batch_size).cpu()

        def logits_fn(features: torch.Tensor) -> torch.Tensor:
            return ZEROSHOT_LOGIT_SCALE * features @ classifier

    refiner = TieRefiner(encoder, lambda features: logits_fn(features.cpu())) if refine_ties else None
    encoded = encode_loader_images(encoder, loader, accelerator, need_labels=True,
                                   refine=refiner.refine if refiner is not None else None)
    if refiner is not None:
        encoded.tie_refinement = refiner.stats()
    labels = _check_single_labels(encoded, len(class_names))
    labelled = labels >= 0
    if not labelled.any():
        raise ValueError(
            f"no labelled images to evaluate: {int((~labelled).sum())} unlabelled, {len(encoded.bad)} skipped as bad"
        )
    with torch.no_grad():
        logits = logits_fn(encoded.features[labelled]).float().cpu()
    return logits, encoded, labels


def _group_metrics(logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, groups: Sequence[str] | None,
                   class_names: list[str], config: GroupEvalConfig) -> dict[str, Any]:
    """Group-level metrics of the labelled images (rows ``indices`` of ``groups``)."""
    if groups is None:
        raise ValueError(f"group-level metrics (aggregate {config.aggregate!r}) need the group id of every image")
    if len(indices) and int(indices.max()) >= len(groups):
        raise ValueError(f"dataset index {int(indices.max())} has no group id ({len(groups)} given)")
    return group_metrics(logits, labels, [groups[i] for i in indices.tolist()], class_names, config.aggregate,
                         config.k, config.label, config.name)


def _check_single_labels(encoded: EncodedImages, num_classes: int) -> torch.Tensor:
    labels = encoded.labels
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(
            f"evaluate_zeroshot needs integer class labels of shape (N,), got {labels.dtype} of shape "
            f"{tuple(labels.shape)}; for multi-label targets use evaluate_multilabel"
        )
    invalid = (labels < -1) | (labels >= num_classes)
    if invalid.any():
        position = int(invalid.nonzero()[0])
        raise ValueError(
            f"label {int(labels[position])} of {describe_sample(encoded, position)} "
            f"is not a class index in [0, {num_classes}) or -1 (no label)"
        )
    return labels.long()


def describe_sample(encoded: EncodedImages, row: int) -> str:
    """How an error message names row ``row`` of ``encoded``: its dataset index when known."""
    if encoded.indices is None:
        return f"sample {row}"
    return f"dataset index {int(encoded.indices[row])}"


# --------------------------------------------------------------------------------------------
# small model helpers
# --------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module, accelerator: Any) -> nn.Module:
    """The bare backbone behind a DDP/compile wrapper (evaluation needs ``tokenize`` and the encoders)."""
    if accelerator is None:
        return model
    return accelerator.unwrap_model(model)

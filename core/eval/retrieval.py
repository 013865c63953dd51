"""Zero-shot image-text retrieval: encode a loader's images and a list of captions, then recall@k.

Captions point at images by dataset index (``text_to_image``), the same index the loader's
batches carry in ``indices``, so the result does not depend on loader order, on workers or on
items the loader had to skip.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from domainclip.core.encode import FrozenEncoder
from domainclip.core.eval.metrics import Rescore, retrieval_metrics
from domainclip.core.eval.zeroshot import (EncodedImages, encode_loader_images, encode_text_tokens, encode_texts,
                                           unwrap_model)
from domainclip.core.losses import paired_late_interaction

__all__ = ["RERANKERS", "RerankConfig", "RetrievalFeatures", "captions_from_records", "evaluate_retrieval",
           "filip_rescorer", "register_reranker", "retrieval_features"]

# Re-ranked candidates score RERANK_OFFSET + their new score: cosines and late-interaction scores lie
# in [-1, 1], so every re-ranked candidate ranks above every other item and keeps its new order.
RERANK_OFFSET = 4.0
# name -> builder(image tokens, image mask, text tokens, text mask, k) -> Rescore
RERANKERS: dict[str, Callable[..., Rescore]] = {}


def register_reranker(name: str) -> Callable[[Callable[..., Rescore]], Callable[..., Rescore]]:
    """Decorator: make ``rerank: {name: NAME}`` on a retrieval task use this rescorer builder."""

    def decorator(builder: Callable[..., Rescore]) -> Callable[..., Rescore]:
        RERANKERS[name] = builder
        return builder

    return decorator


@dataclass
class RerankConfig:
    """Re-rank each query's top ``k`` (by the pooled embeddings) with a finer score; retrieval only.

    Attributes:
        name: ``""`` (off) or ``filip`` (FILIP token-wise late interaction of the final-layer
            tokens). The result then holds the plain recalls and ``reranked_*`` ones side by side.
        k: candidates re-ranked per query (images per caption, captions per image).
    """

    name: str = ""
    k: int = 50

    def __post_init__(self) -> None:
        if self.name and self.name not in RERANKERS:
            close = difflib.get_close_matches(self.name, list(RERANKERS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"rerank.name {self.name!r} is not a re-ranker{hint} (valid: {sorted(RERANKERS)})")
        if self.k < 1:
            raise ValueError(f"rerank.k must be >= 1, got {self.k}")


@register_reranker("filip")
def filip_rescorer(image_tokens: torch.Tensor, image_mask: torch.Tensor, text_tokens: torch.Tensor,
                   text_mask: torch.Tensor, k: int, pairs_per_step: int = 1024) -> Rescore:
    """Re-score each query's top k by late interaction: a caption's images by ``text_to_image``
    (its words' best patches), an image's captions by ``image_to_text`` (its patches' best words),
    the directions FILIP trains. ``pairs_per_step`` bounds memory (pairs x I x T scores)."""

    def rescore(direction: str, start: int, stop: int, scores: torch.Tensor) -> torch.Tensor:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (queries, k)
        queries = torch.arange(start, stop).repeat_interleave(top.shape[1])
        candidates = top.flatten().cpu()
        if direction == "text_to_image":
            image_rows, text_rows = candidates, queries
        else:
            image_rows, text_rows = queries, candidates
        new = torch.empty(candidates.shape[0], dtype=torch.float32)
        for first in range(0, candidates.shape[0], pairs_per_step):
            part = slice(first, first + pairs_per_step)
            new[part] = paired_late_interaction(image_tokens[image_rows[part]], image_mask[image_rows[part]],
                                                text_tokens[text_rows[part]], text_mask[text_rows[part]], direction)
        return scores.scatter(1, top, RERANK_OFFSET + new.view_as(top).to(scores.device, scores.dtype))

    return rescore




def captions_from_records(records: Sequence[Any]) -> tuple[list[str], torch.Tensor]:
    """Flatten every record's ``captions`` into one list and the index of each caption's record.

    ``records[i]`` is an object with ``.captions: list[str]`` (or a mapping with a ``"captions"``
    key); all its captions are used. Returns ``(captions, text_to_image)`` where
    ``text_to_image[j] == i`` for each caption of record ``i``. A record without captions is
    kept as an image (a distractor in text -> image retrieval).
    """
    captions: list[str] = []
    owners: list[int] = []
    for record_number, record in enumerate(records):
        record_captions = _record_captions(record, record_number)
        for caption_number, caption in enumerate(record_captions):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(
                    f"record {record_number} ({_describe(record)}): caption {caption_number} is {caption!r}, "
                    "expected a non-empty string"
                )
            captions.append(caption)
            owners.append(record_number)
    return captions, torch.tensor(owners, dtype=torch.long)


def _record_captions(record: Any, record_number: int) -> Sequence[Any]:
    if isinstance(record, Mapping):
        record_captions = record.get("captions")
    else:
        record_captions = getattr(record, "captions", None)
    if record_captions is None:
        raise ValueError(f"record {record_number} ({_describe(record)}) has no 'captions'")
    if isinstance(record_captions, (str, Mapping)) or not isinstance(record_captions, Sequence):
        hint = "; pick one language first" if isinstance(record_captions, Mapping) else ""
        raise ValueError(
            f"record {record_number} ({_describe(record)}): captions must be a list of strings, "
            f"got {type(record_captions).__name__}{hint}"
        )
    return record_captions


def _describe(record: Any) -> str:
    for attribute in ("path", "image", "filename"):
        value = record.get(attribute) if isinstance(record, Mapping) else getattr(record, attribute, None)
        if value is not None:
            return f"{attribute}={value}"
    return type(record).__name__


def evaluate_retrieval(
    model: nn.Module,
    image_loader: Iterable[Mapping[str, Any]],
    captions: Sequence[str],
    text_to_image: torch.Tensor,
    batch_size: int = 256,
    accelerator: Any = None,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 256,
    precision: str = "auto",
    rerank: RerankConfig | None = None,
) -> dict[str, Any]:
    """Recall@k both ways (see ``retrieval_metrics``) for ``model`` on the loader's images.

    ``text_to_image[j]`` is the dataset index of caption ``j``'s image (as in the batches'
    ``indices``; without ``indices``, the position in loader order). Captions whose image the
    loader skipped cannot be scored: they are counted in ``n_captions_skipped`` and listed in
    ``skipped_captions``; the skipped images are counted in ``n_bad`` and listed in ``bad``.
    Captions are encoded ``batch_size`` at a time; with an accelerator every process encodes
    all captions (the images are split across processes and gathered). Images and captions are
    encoded with the weights held in ``precision`` (``core/encode.py``).

    ``rerank`` (``name`` set): the top ``k`` of every query are re-scored (e.g. by FILIP late
    interaction of the token features, kept for every image and caption on the CPU) and the
    result gains ``reranked_*`` recalls and ``reranked_mean_recall`` beside the plain ones.
    """
    with_tokens = rerank is not None and bool(rerank.name)
    found = retrieval_features(model, image_loader, captions, text_to_image, batch_size, accelerator, precision,
                               with_tokens)
    image_features, text_features, caption_rows = found.image_features, found.text_features, found.caption_rows
    metrics: dict[str, Any] = retrieval_metrics(
        image_features, text_features, caption_rows, ks=ks, block_size=block_size
    )
    if with_tokens:
        encoded = found.encoded
        rescore = RERANKERS[rerank.name](encoded.tokens, encoded.token_mask, found.text_tokens, found.text_mask,
                                         rerank.k)
        reranked = retrieval_metrics(image_features, text_features, caption_rows, ks=ks,
                                     block_size=block_size, rescore=rescore)
        metrics.update({f"reranked_{key}": value for key, value in reranked.items() if "recall" in key})
        metrics["rerank"] = f"{rerank.name}@{rerank.k}"
    metrics["n_captions_skipped"] = int((~found.has_image).sum())
    metrics["skipped_captions"] = (~found.has_image).nonzero().flatten().tolist()
    metrics["n_bad"] = len(found.encoded.bad)
    metrics["bad"] = [list(item) for item in found.encoded.bad]
    return metrics


@dataclass
class RetrievalFeatures:
    """What :func:`evaluate_retrieval` scores: features of the encoded images and of the captions
    whose image was encoded, and which image row each such caption belongs to."""

    image_features: torch.Tensor
    """(I, D) normalised float32, on the encoder's device."""
    text_features: torch.Tensor
    """(T, D) normalised float32 of the kept captions."""
    caption_rows: torch.Tensor
    """(T,) row of ``image_features`` that each kept caption describes."""
    has_image: torch.Tensor
    """(number of captions,) bool: the caption's image was encoded (kept)."""
    encoded: EncodedImages
    text_tokens: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None


def retrieval_features(
    model: nn.Module,
    image_loader: Iterable[Mapping[str, Any]],
    captions: Sequence[str],
    text_to_image: torch.Tensor | Sequence[int],
    batch_size: int = 256,
    accelerator: Any = None,
    precision: str = "auto",
    with_tokens: bool = False,
) -> RetrievalFeatures:
    """Encode the loader's images and the captions of the encoded images (arguments as
    :func:`evaluate_retrieval`'s; ``with_tokens`` also keeps the final-layer tokens of both)."""
    encoder = FrozenEncoder.of(unwrap_model(model, accelerator), precision)
    text_to_image = _check_text_to_image(text_to_image, len(captions))
    dataset = getattr(image_loader, "dataset", None)
    size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    if size is not None and (text_to_image >= size).any():  # a typo, not a caption whose image was skipped
        position = int((text_to_image >= size).nonzero()[0])
        raise ValueError(f"text_to_image[{position}] = {int(text_to_image[position])} is past the data set's "
                         f"{size} images (indices 0 to {size - 1})")
    encoded = encode_loader_images(encoder, image_loader, accelerator, need_labels=False, with_tokens=with_tokens)
    image_indices = encoded.indices
    if image_indices is None:
        if encoded.bad:
            raise ValueError(
                "the image loader skipped bad items but its batches carry no 'indices', "
                "so captions cannot be matched to images"
            )
        image_indices = torch.arange(encoded.features.shape[0])

    caption_rows, has_image = _rows_of_indices(image_indices, text_to_image)
    if not has_image.any():
        raise ValueError("none of the captions' images were encoded; check that text_to_image holds dataset indices")
    kept_captions = [caption for caption, keep in zip(captions, has_image.tolist()) if keep]
    text_tokens = text_mask = None
    if with_tokens:
        text_features, text_tokens, text_mask = encode_text_tokens(encoder, kept_captions, batch_size)
    else:
        text_features = encode_texts(encoder, kept_captions, batch_size)
    return RetrievalFeatures(encoded.features.to(encoder.device), text_features, caption_rows[has_image], has_image,
                             encoded, text_tokens, text_mask)


def _check_text_to_image(text_to_image: torch.Tensor | Sequence[int], num_captions: int) -> torch.Tensor:
    text_to_image = torch.as_tensor(text_to_image)
    if text_to_image.shape != (num_captions,):
        raise ValueError(
            f"text_to_image must have one entry per caption ({num_captions},), got {tuple(text_to_image.shape)}"
        )
    if text_to_image.is_floating_point() or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer dataset indices, got dtype {text_to_image.dtype}")
    if num_captions == 0:
        raise ValueError("evaluate_retrieval got no captions")
    if (text_to_image < 0).any():
        position = int((text_to_image < 0).nonzero()[0])
        raise ValueError(f"text_to_image[{position}] = {int(text_to_image[position])} is not a dataset index (>= 0)")
    return text_to_image.long().cpu()


def _rows_of_indices(sorted_indices: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row of each wanted dataset index in ``sorted_indices`` and whether it is there at all."""
    rows = torch.searchsorted(sorted_indices, wanted).clamp(max=sorted_indices.shape[0] - 1)
    return rows, sorted_indices[rows] == wanted

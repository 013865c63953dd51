"""Per-language image-text retrieval: recall@k per language, their mean, and Mean Rank Variance.

Every language is scored on the same images with one caption per image (``parallel.py``), so the
numbers are comparable across languages. Recall@k follows the core definition
(``core/eval/metrics.py retrieval_metrics``: ties count against the query).

Mean Rank Variance (MRV; Nie et al., "Improving the Consistency in Cross-Lingual Cross-Modal
Retrieval with 1-to-K Contrastive Learning", KDD 2024) measures whether a model ranks the same
item equally well in every language: with ``r[k, i]`` the (1-based) rank of the correct item for
query ``i`` in language ``k``,

    MRV = mean_i ( 1/K * sum_k (r[k, i] - mean_k r[k, i])^2 )

0 means every language ranks each item the same. It is reported for image -> text
(``mrv_image_to_text``: rank of image i's language-k caption among the language-k captions; the
paper's setting) and text -> image (``mrv_text_to_image``: rank of image i for its language-k
caption).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from domainclip.core.data.dataset import Collator, ImageTextDataset
from domainclip.core.data.transforms import build_image_transform
from domainclip.core.eval.metrics import _caption_ranks, _image_ranks, retrieval_metrics
from domainclip.core.eval.report import benchmark_json
from domainclip.core.encode import FrozenEncoder
from domainclip.core.eval.zeroshot import encode_loader_images, encode_texts, unwrap_model

from .parallel import ParallelCaptions
from .tokenization import hf_tokenizer, tokenizer_coverage


def mean_rank_variance(ranks: torch.Tensor) -> float:
    """MRV of ``(K, N)`` ranks (languages x queries): the mean over queries of the population
    variance over languages. Ranks may be 0- or 1-based (the variance does not change)."""
    if ranks.dim() != 2 or ranks.shape[0] < 2 or ranks.shape[1] < 1:
        raise ValueError(f"ranks must be (K >= 2 languages, N >= 1 queries), got shape {tuple(ranks.shape)}")
    return float(ranks.double().var(dim=0, unbiased=False).mean())


def language_ranks(image_features: torch.Tensor, text_features: torch.Tensor,
                   block_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks with caption ``i`` belonging to image ``i``: ``(text -> image, image -> text)``."""
    owners = torch.arange(text_features.shape[0], device=image_features.device)
    text_to_image = _caption_ranks(image_features, text_features, owners, block_size)
    image_to_text, _ = _image_ranks(image_features, text_features, owners, block_size)
    return text_to_image, image_to_text


def _coverage(model: nn.Module, data: ParallelCaptions) -> dict[str, dict[str, float]]:
    """Each language's tokenizer coverage (warns above 10 % unknown); ``{}`` for a tokenizer without
    an unknown token to count (open_clip's byte-level BPE knows every text)."""
    try:
        tokenizer = hf_tokenizer(model)
    except TypeError:
        return {}
    if getattr(tokenizer, "unk_token_id", None) is None:
        return {}
    return tokenizer_coverage(tokenizer, data.captions)


def evaluate_languages(model: nn.Module, data: ParallelCaptions, batch_size: int = 64, num_workers: int = 0,
                       ks: Sequence[int] = (1, 5, 10), precision: str = "auto") -> dict[str, Any]:
    """Retrieval per language on ``data``: ``{"languages": {lang: metrics}, "mean": {...}, MRVs}``.

    Images the loader cannot read are left out of every language (counted in ``n_bad``). Encoded
    with the weights held in ``precision`` (``core/encode.py``).
    """
    coverage = _coverage(unwrap_model(model, None), data)
    model = FrozenEncoder.of(unwrap_model(model, None), precision)
    dataset = ImageTextDataset(data.record_set(data.languages[0]),
                               build_image_transform(model.preprocess, train=False), train=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=Collator(None))
    encoded = encode_loader_images(model, loader, None, need_labels=False)
    rows = encoded.indices if encoded.indices is not None else torch.arange(encoded.features.shape[0])
    images = encoded.features.to(model.device)
    per_language: dict[str, dict[str, Any]] = {}
    t2i, i2t = [], []
    for lang in data.languages:
        texts = encode_texts(model, [data.captions[lang][int(i)] for i in rows], batch_size)
        metrics = retrieval_metrics(images, texts, torch.arange(len(rows)), ks=ks)
        per_language[lang] = metrics
        text_ranks, image_ranks = language_ranks(images, texts)
        t2i.append(text_ranks)
        i2t.append(image_ranks)
    recall_keys = [k for k in per_language[data.languages[0]] if "recall" in k]
    result: dict[str, Any] = {
        "languages": per_language,
        "mean": {k: sum(m[k] for m in per_language.values()) / len(per_language) for k in recall_keys},
        "n_images": len(rows), "n_bad": len(encoded.bad),
    }
    if coverage:
        result["tokenizer_coverage"] = coverage
    if len(data.languages) > 1:
        result["mrv_image_to_text"] = mean_rank_variance(torch.stack(i2t))
        result["mrv_text_to_image"] = mean_rank_variance(torch.stack(t2i))
    return result


def benchmark_records(result: dict[str, Any], dataset: str, model: str, pretrained: str = "") -> list[dict[str, Any]]:
    """CLIP_benchmark records (metrics.json layout): one per language plus ``<dataset>_mean``."""
    records = [benchmark_json("zeroshot_retrieval", metrics, dataset=f"{dataset}_{lang}", model=model,
                              pretrained=pretrained, language=lang)
               for lang, metrics in result["languages"].items()]
    summary = {**result["mean"], **{k: v for k, v in result.items() if k.startswith("mrv_")},
               "n_images": result["n_images"]}
    records.append(benchmark_json("zeroshot_retrieval", summary, dataset=f"{dataset}_mean", model=model,
                                  pretrained=pretrained, language="+".join(result["languages"])))
    return records

"""The ``robustness`` eval task: clean, PGD and corrupted numbers of one split, side by side.

Every condition (clean, ``pgd_eps<e>`` for each radius, each corruption of the task's set) is
scored on the same images from the same pixels (``PixelSpace.to_pixels`` of the loader's
normalised batch), so ``eps = 0`` reproduces the clean number exactly. Zero-shot classification
is attacked with the cross-entropy of the prompt-ensemble head (logit scale 100 as
CLIP_benchmark); image -> text retrieval with the cross-entropy of an image's own captions
against all captions of the split. The model runs in eval mode in float32.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.dataset import derive_seed
from ..eval.metrics import retrieval_metrics
from ..encode import eval_mode, model_device
from ..eval.zeroshot import ZEROSHOT_LOGIT_SCALE, build_zeroshot_classifier, encode_texts
from .attack import pgd_linf
from .config import RobustnessConfig, eps_label
from .corruptions import corrupt, corruption_set
from .pixels import PixelSpace

LossFn = Callable[[torch.Tensor], torch.Tensor]


def condition_names(cfg: RobustnessConfig) -> list[str]:
    """``clean``, ``pgd_eps<e>`` per radius, then the corruption names, in report order."""
    return ["clean", *(eps_label(eps) for eps in cfg.eps), *corruption_set(cfg.corruptions)]


class Conditions:
    """Produces the pixels of every condition for one batch (attacks seeded once per task)."""

    def __init__(self, model: nn.Module, cfg: RobustnessConfig):
        self.model = model
        self.cfg = cfg
        self.space = PixelSpace(model.preprocess)
        self.corruptions = corruption_set(cfg.corruptions)
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.space.normalise(pixels).to(self.dtype), normalize=True).float()

    def generator(self, index: int, condition: str) -> torch.Generator:
        """The random stream of one image under one condition: seeded by ``(seed, dataset index,
        condition)``, so an image gets the same noise whatever batch it comes in."""
        return torch.Generator().manual_seed(derive_seed(self.cfg.seed, index, condition))

    def each(self, pixels: torch.Tensor, indices: torch.Tensor,
             loss_of_features: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalised image features of every condition for one batch of clean ``pixels`` (the
        images ``indices`` of the data set)."""
        out: dict[str, torch.Tensor] = {}
        rows = [int(i) for i in indices]
        with torch.no_grad():
            out["clean"] = self.features(pixels)
        for eps in self.cfg.eps:
            label = eps_label(eps)
            noise = torch.stack([torch.rand(pixels.shape[1:], generator=self.generator(i, label), dtype=pixels.dtype)
                                 for i in rows]) if self.cfg.random_start else None
            adversarial = pgd_linf(lambda p: loss_of_features(self.features(p)), pixels, eps / 255, self.cfg.steps,
                                   self.cfg.step_of(eps) / 255, self.cfg.random_start, start_noise=noise)
            with torch.no_grad():
                out[label] = self.features(adversarial)
        with torch.no_grad():
            for name in self.corruptions:
                corrupted = torch.cat([corrupt(name, pixels[j:j + 1], self.cfg.severity, self.generator(i, name))
                                       for j, i in enumerate(rows)])
                out[name] = self.features(corrupted)
        return out


def _batches(loader: Iterable[Mapping[str, Any]], space: PixelSpace, device: torch.device):
    """(pixels, labels, indices, bad) of each non-empty batch; pixels in [0, 1] on ``device``."""
    for batch in loader:
        images = batch["images"]
        bad = [tuple(item) for item in batch.get("bad") or []]
        if images.shape[0] == 0:
            yield None, None, None, bad
            continue
        pixels = space.to_pixels(images.to(device=device, dtype=torch.float32))
        yield pixels, batch.get("labels"), torch.as_tensor(batch["indices"]).long(), bad


def robust_zeroshot(model: nn.Module, loader: Iterable[Mapping[str, Any]], class_names: Sequence[str],
                    templates: Sequence[str], cfg: RobustnessConfig) -> dict[str, Any]:
    """``acc1_<condition>`` for every condition (unlabelled images, label -1, are left out)."""
    device = model_device(model)
    with eval_mode(model, no_grad=False):
        classifier = build_zeroshot_classifier(model, list(class_names), templates, precision="fp32")
        conditions = Conditions(model, cfg)
        correct = {name: 0 for name in condition_names(cfg)}
        seen, bad = 0, []
        with torch.enable_grad():
            for pixels, labels, batch_indices, batch_bad in _batches(loader, conditions.space, device):
                bad += batch_bad
                if pixels is None:
                    continue
                keep = labels >= 0
                if not keep.any():
                    continue
                pixels, labels = pixels[keep.to(pixels.device)], labels[keep].to(device)
                batch_indices = batch_indices[keep]

                def loss(features: torch.Tensor, labels: torch.Tensor = labels) -> torch.Tensor:
                    return F.cross_entropy(ZEROSHOT_LOGIT_SCALE * features @ classifier, labels, reduction="none")

                for name, features in conditions.each(pixels, batch_indices, loss).items():
                    correct[name] += int(((features @ classifier).argmax(-1) == labels).sum())
                seen += int(labels.shape[0])
    if not seen:
        raise ValueError(f"robustness: no labelled images to evaluate ({len(bad)} skipped as bad)")
    metrics: dict[str, Any] = {f"acc1_{name}": hits / seen for name, hits in correct.items()}
    return {**metrics, **_summary(cfg, seen, bad)}


def caption_loss(features: torch.Tensor, text: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Per image: -log of the softmax mass (over all captions) on its own captions (``own``: B x T);
    0 for an image without captions."""
    logits = ZEROSHOT_LOGIT_SCALE * features @ text.T
    has_caption = own.any(dim=-1, keepdim=True)
    positive = torch.logsumexp(logits.masked_fill(~(own | ~has_caption), float("-inf")), dim=-1)
    return (torch.logsumexp(logits, dim=-1) - positive) * has_caption.squeeze(-1)


def robust_retrieval(model: nn.Module, loader: Iterable[Mapping[str, Any]], captions: Sequence[str],
                     text_to_image: torch.Tensor, cfg: RobustnessConfig, ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """``text_retrieval_recall@k_<condition>`` (image -> text) for every condition.

    The attack lowers the probability mass of an image's own captions among all captions;
    images without a caption are scored as distractors but not attacked.
    """
    device = model_device(model)
    text_to_image = torch.as_tensor(text_to_image).long()
    with eval_mode(model, no_grad=False):
        text = encode_texts(model, list(captions), precision="fp32")
        conditions = Conditions(model, cfg)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in condition_names(cfg)}
        indices, bad = [], []
        with torch.enable_grad():
            for pixels, _, batch_indices, batch_bad in _batches(loader, conditions.space, device):
                bad += batch_bad
                if pixels is None:
                    continue
                own = (text_to_image[None, :] == batch_indices[:, None]).to(device)

                def loss(features: torch.Tensor, own: torch.Tensor = own) -> torch.Tensor:
                    return caption_loss(features, text, own)

                for name, features in conditions.each(pixels, batch_indices, loss).items():
                    parts[name].append(features.cpu())
                indices.append(batch_indices)
    if not indices:
        raise ValueError(f"robustness: the loader yielded no images ({len(bad)} skipped as bad)")
    order = torch.cat(indices)
    sorted_indices, permutation = order.sort()
    rows = torch.searchsorted(sorted_indices, text_to_image).clamp(max=len(sorted_indices) - 1)
    present = sorted_indices[rows] == text_to_image
    metrics: dict[str, Any] = {}
    for name, chunks in parts.items():
        scores = retrieval_metrics(torch.cat(chunks)[permutation], text.cpu()[present], rows[present], ks=ks)
        metrics.update({f"{key}_{name}": value for key, value in scores.items() if key.startswith("text_retrieval")})
    metrics["n_captions_skipped"] = int((~present).sum())
    return {**metrics, **_summary(cfg, len(order), bad)}


def _summary(cfg: RobustnessConfig, images: int, bad: list) -> dict[str, Any]:
    return {"n_images": images, "eps_255": list(cfg.eps), "pgd_steps": cfg.steps,
            "pgd_step_size_255": {eps_label(eps): cfg.step_of(eps) for eps in cfg.eps},
            "corruptions": list(corruption_set(cfg.corruptions)), "corruption_severity": cfg.severity,
            "seed": cfg.seed, "n_bad": len(bad), "bad": [list(item) for item in bad]}

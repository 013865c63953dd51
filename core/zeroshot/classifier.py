"""``ZeroShotClassifier``: class probabilities of images for any label set, for applications.

The text side is the kit's prompt-ensemble classifier (``build_zeroshot_classifier``: every
template filled with every label, encoded, averaged per label), computed once per (labels,
templates) and kept in memory, so repeated calls with the same labels only run the image tower.
Probabilities follow the model's training objective: ``softmax(logit_scale * cosine)`` for CLIP,
``sigmoid(logit_scale * cosine + logit_bias)`` for models with a logit bias (SigLIP: each label
is an independent yes/no, the probabilities need not sum to 1). A run folder whose method has a
classifier of its own (learned prompts, a linear probe, a Tip-Adapter cache) classifies with it:
``softmax`` of the method's logits.

Images and prompts are encoded through the kit's one encode path (``core/encode.py``): the
frozen weights are held in ``precision`` (``auto``: bf16 where the device computes it fast, else
fp32), cast once when the classifier is built, for the images; the label classifier (a few
prompts, once per label set) is always encoded in fp32 so near-tied labels keep fp32's order. Decoding runs in ``workers`` background threads,
overlapping the forward pass; ``last_timing`` says where the time of the last call went.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..encode import FrozenEncoder, canonical_device
from ..eval import TieRefiner, build_zeroshot_classifier
from ..token_merging import TokenMergingConfig, apply_token_merging, token_merging_key
from .images import EncodeTiming, ImageInput, ImagePreparer, as_image_list, image_name
from .loading import LoadedModel, LogitsFactory, describe, load_model

Templates = Sequence[str] | Mapping[str, Sequence[str]]


@dataclass
class ZeroShotResult:
    """The prediction for one image.

    Attributes:
        image: the image's path, or ``#i`` (its position in the input) for in-memory images.
        labels: the ``top_k`` most probable labels, most probable first.
        probabilities: their probabilities, in the same order.
    """

    image: str
    labels: list[str]
    probabilities: list[float]

    @property
    def label(self) -> str:
        """The most probable label."""
        return self.labels[0]

    @property
    def probability(self) -> float:
        """The probability of the most probable label."""
        return self.probabilities[0]

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image,
                "predictions": [{"label": label, "probability": prob}
                                for label, prob in zip(self.labels, self.probabilities)]}


class PromptEnsembleHead(nn.Module):
    """Normalised image features (N, D) -> probabilities (N, C) against prompt-ensemble weights."""

    def __init__(self, weights: torch.Tensor, logit_scale: float, logit_bias: float | None):
        super().__init__()
        self.register_buffer("weights", weights.detach().float().clone())
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.sigmoid = logit_bias is not None
        self.register_buffer("logit_bias", torch.tensor(float(logit_bias or 0.0)))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits (N, C); probabilities are monotone in them, row by row."""
        logits = self.logit_scale * (features.float() @ self.weights)
        return logits + self.logit_bias if self.sigmoid else logits

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.logits(features)
        return torch.sigmoid(logits) if self.sigmoid else logits.softmax(dim=-1)


class MethodHead(nn.Module):
    """A trained method's classifier (``logits_fn`` on CPU features) -> softmax probabilities."""

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.logits_fn = logits_fn

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits (N, C) on the features' device."""
        return self.logits_fn(features.float().cpu()).float().to(features.device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).softmax(dim=-1)


def check_labels(labels: Sequence[str]) -> list[str]:
    """The label list as strings; empty, blank or repeated labels are errors."""
    if isinstance(labels, str):
        raise ValueError(f"labels must be a list of class names, got the string {labels!r} "
                         "(split it, e.g. labels.split(','))")
    labels = [str(label).strip() for label in labels]
    if not labels:
        raise ValueError("labels is empty: give at least one class name")
    blank = [i for i, label in enumerate(labels) if not label]
    if blank:
        raise ValueError(f"labels has blank entries at positions {blank}")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"labels are repeated: {repeated}; each class name must appear once")
    return labels


def _templates_key(templates: Templates) -> tuple:
    if isinstance(templates, Mapping):
        return ("per-class", tuple(sorted((str(k), tuple(v)) for k, v in templates.items())))
    return ("shared", tuple(templates))


def as_templates(templates: str | Templates) -> Templates:
    """A template, a list of them or a ``{label: [prompts]}`` dict, as ``head`` takes them (one
    string is one template, not a list of its characters)."""
    if isinstance(templates, str):
        return [templates]
    if isinstance(templates, Mapping):
        return {str(label): [prompts] if isinstance(prompts, str) else list(prompts)
                for label, prompts in templates.items()}
    return list(templates)


def pick_device(device: str | torch.device | None) -> torch.device:
    """``None`` = the GPU when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return canonical_device(device)


class ZeroShotClassifier:
    """Zero-shot image classification with any backbone or finished run of the kit.

    The text side is cached: one head per (labels, templates), the ``max_cached_heads`` (64) most
    recently used kept.

    Args:
        model: a backbone (or a method's wrapper of one) with ``encode_image``, ``tokenize``,
            ``preprocess`` and ``logit_scale``. The classifier takes it over: it is moved to
            ``device``, put in eval mode and, with ``token_merging``, given that schedule; pass
            ``copy.deepcopy(model)`` to keep training the original.
        templates: default prompts: a template with ``{}`` (``"a photo of a {}."``), a list of them,
            or a ``{label: [prompts]}`` dict; ``classify`` may override.
        logits_factory: a trained method's ``logits_fn``, or None for the prompt ensemble.
        device: ``"cpu"``, ``"cuda"``, ...; None picks the GPU when there is one.
        batch_size: images per forward pass of the image tower.
        workers: background threads that decode and resize images while the previous batch runs
            through the model (0 = decode in the calling thread, no overlap).
        precision: ``auto`` / ``fp32`` / ``bf16`` / ``fp16``: the dtype the frozen weights are
            held in for encoding (see ``core/encode.py``); ``model`` itself keeps its dtype.
        source, method: what was loaded (reported by ``info``).
        token_merging: merge image tokens (ToMe / PiToMe): a ``TokenMergingConfig`` or its
            command-line form (``"tome:8"``, ``"pitome:flops=0.6"``, ``"tome:0"`` = off); None keeps
            the model's own setting (a run's recipe ``token_merging``, else none).
        decode_on_device: decode JPEG files on ``device`` (nvJPEG on a GPU) and resize them
            there; the threads only read files (see ``ImagePreparer``). Off by default: a GPU
            decoder's pixels differ from PIL's by a few levels.
        refine_ties: when the weights are held in bf16 / fp16, re-encode in fp32 the images whose
            top-1 label is near a tie (``core/eval/tie_refine.py``), so ``classify`` and
            ``predict_proba`` rank the labels of those images as fp32 does; ``last_timing.refined``
            counts them. ``encode_images`` (no labels, no decision) is not refined.
    """

    def __init__(self, model: nn.Module, templates: str | Templates | None = None,
                 logits_factory: LogitsFactory | None = None, device: str | torch.device | None = None,
                 batch_size: int = 32, workers: int = 2, source: str = "", method: str = "",
                 precision: str = "auto", token_merging: TokenMergingConfig | str | None = None,
                 decode_on_device: bool = False, refine_ties: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if token_merging is not None:
            parsed = TokenMergingConfig.parse(token_merging) if isinstance(token_merging, str) else token_merging
            apply_token_merging(model, parsed)
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.encoder = FrozenEncoder(self.model, precision, self.device)
        self.templates = as_templates(templates) if templates else ["a photo of a {}."]
        self.logits_factory = logits_factory
        self.batch_size = batch_size
        self.images = ImagePreparer(model.preprocess, workers, decode_on=self.device if decode_on_device else None)
        self.source, self.method = source, method
        self.last_timing = EncodeTiming()
        self._heads: OrderedDict[tuple, nn.Module] = OrderedDict()  # least recently used first
        self.refine_ties = refine_ties
        self._refiners: dict[int, TieRefiner] = {}

    max_cached_heads = 64

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, device: str | torch.device | None = None,
                        batch_size: int = 32, workers: int = 2, pretrained: str = "",
                        revision: str = "", precision: str = "auto",
                        token_merging: TokenMergingConfig | str | None = None,
                        decode_on_device: bool = False, refine_ties: bool = False) -> "ZeroShotClassifier":
        """Load a run folder, a model folder (open_clip / Hugging Face / compact base), an open_clip
        architecture or ``hf-hub:`` id, a Hugging Face id, or ``compact_base``.

        ``pretrained``: weights tag or file for an open_clip architecture name; ``revision``: git
        revision of a Hugging Face hub id; ``precision``: ``auto`` / ``fp32`` / ``bf16`` / ``fp16``
        (see ``core/encode.py``); ``token_merging``, ``decode_on_device``, ``refine_ties``: see the class.
        """
        loaded = load_model(path_or_id, pretrained=pretrained, revision=revision)
        return cls.from_loaded(loaded, device=device, batch_size=batch_size, workers=workers, precision=precision,
                               token_merging=token_merging, decode_on_device=decode_on_device,
                               refine_ties=refine_ties)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, **kwargs: Any) -> "ZeroShotClassifier":
        return cls(loaded.model, templates=loaded.templates, logits_factory=loaded.logits_factory,
                   source=loaded.source, method=loaded.method, **kwargs)

    @property
    def precision(self) -> str:
        """The precision the frozen weights are held in for encoding (``auto`` resolved)."""
        return self.encoder.precision

    @property
    def preprocess(self):
        """The weights' ``PreprocessConfig`` (image size, mean, std, resize)."""
        return self.model.preprocess

    def info(self) -> dict[str, Any]:
        """What this classifier runs: source, method, backbone kind, device, default templates."""
        loaded = LoadedModel(self.model, self.source, self.templates, self.logits_factory, self.method)
        return {**describe(loaded), "device": str(self.device), "precision": self.precision,
                "refine_ties": self.refine_ties, "packed_linears": self.encoder.packed_linears,
                "templates": dict(self.templates) if isinstance(self.templates, Mapping) else list(self.templates),
                "preprocess": self.preprocess.to_dict(), "token_merging": token_merging_key(self.model)}

    # --- the text side: one head per (labels, templates), cached -------------------------------
    def head(self, labels: Sequence[str], templates: Templates | None = None) -> nn.Module:
        """Features -> probabilities for ``labels`` (built on first use, then from memory)."""
        labels = check_labels(labels)
        templates = self.templates if templates is None else as_templates(templates)
        key = (tuple(labels), _templates_key(templates))
        if key in self._heads:
            self._heads.move_to_end(key)
            return self._heads[key]
        self._heads[key] = self._build_head(labels, templates)
        while len(self._heads) > self.max_cached_heads:  # a service sees any number of label sets
            _, evicted = self._heads.popitem(last=False)
            self._refiners.pop(id(evicted), None)
        return self._heads[key]

    def _build_head(self, labels: list[str], templates: Templates) -> nn.Module:
        if self.logits_factory is not None:
            if isinstance(templates, Mapping):
                raise ValueError(f"method {self.method!r} classifies with its own head; it takes a list of "
                                 "templates, not class-specific prompts")
            logits_fn = self.logits_factory(self.model, labels, list(templates))
            if logits_fn is not None:
                return MethodHead(logits_fn)
        weights = build_zeroshot_classifier(self.model, labels, templates)  # fp32: once per label set
        bias = getattr(self.model, "logit_bias", None)
        with torch.no_grad():
            scale = float(self.model.logit_scale.exp())
        return PromptEnsembleHead(weights, scale, None if bias is None else float(bias.detach())).to(self.device)

    def clear_cache(self, weights: bool = True) -> None:
        """Forget the cached text classifiers and re-cast the frozen weights (after changing the
        model's weights); ``weights=False`` keeps the frozen weights and forgets only the label
        classifiers and their tie-refinement calibration (built again on the next call)."""
        self._heads.clear()
        self._refiners.clear()
        if weights:
            self.encoder.refresh()

    # --- the image side ------------------------------------------------------------------------
    def encode_images(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """L2-normalised image features (N, D), float32 on the classifier's device, in batches."""
        return torch.cat(list(self._encoded_batches(as_image_list(images), head=None)))

    def predict_proba(self, images: ImageInput | Sequence[ImageInput], labels: Sequence[str],
                      templates: Templates | None = None) -> torch.Tensor:
        """Probabilities (N images, C labels) as a float32 CPU tensor, in input and label order."""
        head = self.head(labels, templates)
        return torch.cat([part.cpu() for part in self._encoded_batches(as_image_list(images), head)])

    def _refiner(self, head: nn.Module) -> TieRefiner | None:
        """The head's tie refiner (its calibration kept across calls), or None when not refining."""
        if not self.refine_ties:
            return None
        if id(head) not in self._refiners:
            self._refiners[id(head)] = TieRefiner(self.encoder, head.logits)
        return self._refiners[id(head)]

    def _encoded_batches(self, items: list[ImageInput], head: nn.Module | None) -> Iterator[torch.Tensor]:
        """Features (or ``head``'s probabilities) batch by batch; decoding overlaps the forward pass."""
        timing = EncodeTiming(images=len(items))
        refiner = self._refiner(head) if head is not None else None
        refined_before = refiner.refined if refiner is not None else 0
        started = time.perf_counter()
        for batch in self.images.batches(items, self.batch_size, timing):
            forward_started = time.perf_counter()
            with torch.inference_mode():
                out = self.encoder.encode_image(batch)
                if refiner is not None:
                    out = refiner.refine(batch, out)
                out = head(out).float() if head is not None else out
            if out.is_cuda:
                torch.cuda.synchronize(out.device)  # the forward time is the kernels', not their launch
            timing.forward_s += time.perf_counter() - forward_started
            yield out
        timing.wall_s = time.perf_counter() - started
        timing.refined = refiner.refined - refined_before if refiner is not None else 0
        self.last_timing = timing

    def classify(self, images: ImageInput | Sequence[ImageInput], labels: Sequence[str],
                 templates: Templates | None = None, top_k: int | None = None) -> list[ZeroShotResult]:
        """The ``top_k`` most probable labels of each image (all labels when None), one result per image."""
        labels = check_labels(labels)
        items = as_image_list(images)
        probabilities = self.predict_proba(items, labels, templates)
        return rank(probabilities, labels, [image_name(item, i) for i, item in enumerate(items)], top_k)


def rank(probabilities: torch.Tensor, labels: Sequence[str], names: Sequence[str],
         top_k: int | None) -> list[ZeroShotResult]:
    """Per-image results from a (N, C) probability matrix, sorted most probable first."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for all labels), got {top_k}")
    k = len(labels) if top_k is None else min(top_k, len(labels))
    values, order = probabilities.sort(dim=-1, descending=True, stable=True)
    return [ZeroShotResult(name, [labels[j] for j in row_order[:k].tolist()], row_values[:k].tolist())
            for name, row_values, row_order in zip(names, values, order)]


def results_to_rows(results: Sequence[ZeroShotResult]) -> list[dict[str, Any]]:
    """Long table of results: one row per (image, rank) with label and probability."""
    return [{"image": result.image, "rank": rank_index + 1, "label": label, "probability": prob}
            for result in results
            for rank_index, (label, prob) in enumerate(zip(result.labels, result.probabilities))]


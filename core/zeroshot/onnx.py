"""ONNX export of a zero-shot classifier for one fixed label set, and classification with it.

The exported graph is the image tower plus the classifier head: ``pixel_values`` (batch, C, S, S),
preprocessed as the weights expect, in; ``probabilities`` (batch, labels) out. The batch axis
is dynamic. The text tower is not exported: the label set's text classifier is baked in as
constant weights. Everything a caller needs to use the file (labels, templates, preprocessing,
softmax or sigmoid, the token-merging schedule) is stored in the ONNX model's metadata under
``domainclip.zeroshot``, so
:class:`OnnxZeroShotClassifier` needs only the ``.onnx`` file and onnxruntime (no torch model).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones.base import PreprocessConfig
from ..token_merging import apply_token_merging, merging_of, token_merging_key
from .classifier import PromptEnsembleHead, Templates, ZeroShotClassifier, ZeroShotResult, check_labels, rank
from .images import ImageInput, ImagePreparer, as_image_list, image_name

METADATA_KEY = "domainclip.zeroshot"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "probabilities"
FORMAT_VERSION = 1
# protobuf cannot hold a single file over 2 GB; bigger models keep their weights in a .data file
SINGLE_FILE_LIMIT = 1_800_000_000


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"ONNX support needs the {module!r} package: pip install onnx onnxruntime onnxscript") from None


class ImageToProbabilities(nn.Module):
    """Preprocessed images -> class probabilities: the image tower then the classifier head."""

    def __init__(self, model: nn.Module, head: nn.Module):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.encode_image(pixel_values, normalize=True))


def export_onnx(classifier: ZeroShotClassifier, labels: Sequence[str], path: str | os.PathLike,
                templates: Templates | None = None, opset: int = 18) -> Path:
    """Write ``classifier``'s image tower + head for ``labels`` to ``path`` (an ``.onnx`` file).

    The batch axis is dynamic. Returns the path. The graph holds the weights in fp32: its
    probabilities equal ``predict_proba`` of a classifier with ``precision="fp32"`` up to float
    rounding (the tests check <= 1e-4); a bf16 / fp16 classifier differs from them by its own
    rounding.
    """
    onnx = _require("onnx")
    labels = check_labels(labels)
    used_templates = classifier.templates if templates is None else templates
    head = classifier.head(labels, used_templates)
    module = ImageToProbabilities(classifier.model, head).eval()
    preprocess = classifier.preprocess
    example = torch.zeros(2, preprocess.channels, preprocess.image_size, preprocess.image_size,
                          device=classifier.device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad(), fixed_merge_schedule(classifier.model, example) as merging:
        torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes={"pixel_values": {0: batch}}, opset_version=opset, dynamo=True,
                          external_data=size > SINGLE_FILE_LIMIT, verbose=False)
    metadata = {
        "format_version": FORMAT_VERSION,
        "labels": labels,
        "templates": (dict(used_templates) if isinstance(used_templates, Mapping)
                      else [used_templates] if isinstance(used_templates, str) else list(used_templates)),
        "preprocess": preprocess.to_dict(),
        "output": ("sigmoid" if isinstance(head, PromptEnsembleHead) and head.sigmoid else "softmax"),
        "source": classifier.source,
        "method": classifier.method,
        "token_merging": merging,
    }
    proto = onnx.load(str(path), load_external_data=False)
    entry = next((p for p in proto.metadata_props if p.key == METADATA_KEY), None) or proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(proto, str(path))
    return path


@contextmanager
def fixed_merge_schedule(model: nn.Module, example: torch.Tensor) -> Iterator[dict[str, Any] | None]:
    """The model's token merging frozen to the per-block schedule of ``example``'s image size (the
    graph then has fixed token counts); yields the setting with its schedule, None without merging."""
    state = merging_of(model)
    if state is None:
        yield None
        return
    model.encode_image(example)  # plans the schedule for this image size
    apply_token_merging(model, state.cfg, schedule=list(state.schedule))
    try:
        yield token_merging_key(model)
    finally:
        apply_token_merging(model, state.cfg, schedule=state.fixed)


class OnnxZeroShotClassifier:
    """Classify images with a file written by :func:`export_onnx`, on onnxruntime.

    The label set is the exported one. ``providers`` are onnxruntime execution providers (default:
    CUDA when onnxruntime has it, else CPU); ``threads`` sets onnxruntime's intra-op threads (0 =
    its default).
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, batch_size: int = 32,
                 workers: int = 0, threads: int = 0):
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {str(self.path)!r} does not exist")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = list(providers) if providers else [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                                       if p in available]
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        custom = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in custom:
            raise ValueError(f"{self.path} has no {METADATA_KEY!r} metadata: it was not written by "
                             "domainclip's export_onnx (export it with `domainclip classify --export-onnx`)")
        self.metadata: dict[str, Any] = json.loads(custom[METADATA_KEY])
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{self.path}: zero-shot metadata version {self.metadata.get('format_version')!r}; "
                             f"this domainclip reads version {FORMAT_VERSION}")
        self.labels: list[str] = list(self.metadata["labels"])
        self.preprocess = PreprocessConfig(**self.metadata["preprocess"])
        self.images = ImagePreparer(self.preprocess, workers)
        self.batch_size = batch_size

    def predict_proba(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Probabilities (N images, C exported labels) as a float32 CPU tensor."""
        items = as_image_list(images)
        parts = []
        for batch in self.images.batches(items, self.batch_size):
            output = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
            parts.append(torch.from_numpy(output).float())
        return torch.cat(parts)

    def classify(self, images: ImageInput | Sequence[ImageInput], labels: Sequence[str] | None = None,
                 top_k: int | None = None) -> list[ZeroShotResult]:
        """Like ``ZeroShotClassifier.classify``; ``labels``, if given, are exported labels in any
        order, or a subset of them (softmax probabilities are renormalised over the subset, which
        equals a softmax over only those labels; sigmoid scores are per label and kept)."""
        chosen = self.labels if labels is None else self._subset(check_labels(labels))
        columns = [self.labels.index(label) for label in chosen]
        items = as_image_list(images)
        probabilities = self.predict_proba(items)[:, columns]
        if self.metadata.get("output") == "softmax" and len(columns) < len(self.labels):
            probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        return rank(probabilities, chosen, [image_name(item, i) for i, item in enumerate(items)], top_k)

    def _subset(self, labels: list[str]) -> list[str]:
        unknown = [label for label in labels if label not in self.labels]
        if unknown:
            raise ValueError(f"{self.path} was exported for labels {self.labels}; {unknown} are not among them. "
                             "Give those labels in any order or a subset of them, or export again for a new label set")
        return labels

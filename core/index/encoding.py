"""The one place where index, search and serve run the model.

Every forward pass of ``domainclip index`` / ``search`` / ``serve`` goes through :class:`Encoder`:
image batches, texts, and the cached zero-shot heads of ``/classify``. It runs on the kit's one
encode path (``core/encode.py``: the frozen weights held once in ``precision``, ``auto`` = bf16
where the device computes it fast) through the zero-shot API's ``ZeroShotClassifier``.

The model's **fingerprint** pins an index to the weights that built it: the SHA-256 of every
tensor of the model (``tensors_sha256`` over the sorted state dict) plus its preprocessing.
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import config as config_lib
from ..data.transforms import build_image_transform
from ..features.cache import tensors_sha256
from ..recipe_files import list_recipes, resolve_recipe
from ..run_config import RunConfig
from ..train import build_model
from ..zeroshot import ZeroShotClassifier
from ..zeroshot.loading import LoadedModel, describe, load_model

RECIPE_SUFFIXES = (".yaml", ".yml")


def load_for_encoding(spec: str) -> LoadedModel:
    """MODEL of ``index`` / ``search`` / ``serve``: a run, an export or model folder, a model id,
    ``compact_base``, or a base recipe (YAML path or bundled name such as ``remote_sensing/full``).

    A local path is recorded as an absolute ``source`` (an index reloads its model from there, from
    any working directory). A recipe's model is built under its ``train.seed``, so a method's new
    parameters (LoRA's, a projector's) are the same at every load and the weights' hash with them.
    """
    local = Path(spec).expanduser()
    source = str(local.absolute()) if local.exists() else spec
    if spec.endswith(RECIPE_SUFFIXES) or (not local.exists() and _is_bundled_recipe(spec)):
        cfg = config_lib.load(RunConfig, resolve_recipe(spec), [])
        with torch.random.fork_rng(devices=[]):  # the model is built on the CPU
            torch.default_generator.manual_seed(cfg.train.seed)
            model, _ = build_model(cfg)
        return LoadedModel(model=model, source=source, templates=list(cfg.data.train.templates or ["a photo of a {}."]))
    return dataclasses.replace(load_model(spec), source=source) if local.exists() else load_model(spec)


def _is_bundled_recipe(spec: str) -> bool:
    return spec in list_recipes()


class Encoder:
    """A loaded model that turns images and texts into L2-normalised float32 embeddings.

    Args:
        loaded: what ``load_for_encoding`` returned.
        device: ``"cpu"``, ``"cuda"``...; None = the GPU when there is one.
        batch_size: images per forward pass when encoding lists of images.
        precision: ``auto`` / ``fp32`` / ``bf16`` / ``fp16``: the dtype the frozen weights are held in
            (``core/encode.py``); an index records it in its manifest.
    """

    def __init__(self, loaded: LoadedModel, device: str | None = None, batch_size: int = 32,
                 precision: str = "auto"):
        self.classifier = ZeroShotClassifier.from_loaded(loaded, device=device, batch_size=batch_size,
                                                         precision=precision)
        reader = self.classifier.preprocess.reader
        if reader:  # the index, search and service decode RGB images (also inside tar shards)
            raise ValueError(f"model {loaded.source!r} reads its images with the {reader.get('name')!r} reader "
                             f"(model.input, e.g. multispectral bands); index, search and serve take RGB models "
                             f"only: evaluate it with domainclip eval or ZeroShotClassifier")
        self.transform = build_image_transform(self.classifier.preprocess, train=False)
        self._head_lock = threading.Lock()
        self._fingerprint: dict[str, Any] | None = None

    @classmethod
    def load(cls, spec: str, device: str | None = None, batch_size: int = 32, precision: str = "auto") -> "Encoder":
        """Load MODEL ``spec`` (see :func:`load_for_encoding`)."""
        return cls(load_for_encoding(spec), device=device, batch_size=batch_size, precision=precision)

    @property
    def precision(self) -> str:
        """The resolved precision the weights are held in for encoding."""
        return self.classifier.precision

    @property
    def device(self) -> torch.device:
        return self.classifier.device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, S, S)`` of one preprocessed image."""
        pre = self.classifier.preprocess
        return (pre.channels, pre.image_size, pre.image_size)

    def fingerprint(self) -> dict[str, Any]:
        """``{"sha256", "source", "kind", "method", "embed_dim", "preprocess", "precision"}`` of the loaded
        model (``precision`` is recorded, not pinned: bf16 and fp32 queries search the same index)."""
        if self._fingerprint is None:
            model = self.classifier.model
            state = sorted(model.state_dict().items())
            info = describe(LoadedModel(model, self.classifier.source, method=self.classifier.method))
            probe = self.encode_texts(["a"])
            self._fingerprint = {"sha256": tensors_sha256(state), "source": info["source"], "kind": info["kind"],
                                 "method": info["method"], "embed_dim": int(probe.shape[1]),
                                 "preprocess": self.classifier.preprocess.to_dict(), "precision": self.precision}
        return self._fingerprint

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """One decoded image -> ``(C, S, S)`` preprocessed tensor (the index's own transform)."""
        return self.classifier.images.prepare(image, 0)

    def encode_batch(self, images: torch.Tensor) -> np.ndarray:
        """Preprocessed ``(B, C, S, S)`` images -> ``(B, D)`` float32 embeddings."""
        with torch.inference_mode():
            features = self.classifier.encoder.encode_image(images, normalize=True)
        return features.cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> ``(N, D)`` float32 embeddings."""
        if not texts:
            raise ValueError("no texts to encode: give at least one")
        with torch.inference_mode():
            return self.classifier.encoder.encode_texts(list(texts)).cpu().numpy()

    def probabilities(self, embeddings: np.ndarray, labels: Sequence[str],
                      templates: Sequence[str] | None = None) -> np.ndarray:
        """``(N, D)`` image embeddings -> ``(N, C)`` zero-shot probabilities for ``labels``.

        The text head of each (labels, templates) is built once and kept (``ZeroShotClassifier.head``).
        """
        with self._head_lock:
            head = self.classifier.head(labels, templates)
        with torch.inference_mode():
            features = torch.from_numpy(np.ascontiguousarray(embeddings)).to(self.device)
            return head(features).float().cpu().numpy()

    def default_templates(self) -> list[str]:
        """The model's own prompt templates (a run's training templates, else ``a photo of a {}.``)."""
        return list(self.classifier.templates)

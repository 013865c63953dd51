"""Cross-lingual methods: teacher learning (Multilingual-CLIP) and 1-to-K contrastive training.

Both are ordinary methods run by the one training loop (core/train/loop.py); they only decide
what is trainable, how a batch's loss is computed and what is saved.

``teacher`` (Carlsson et al., "Cross-lingual and Multilingual CLIP", LREC 2022): the backbone's
text tower is the *student*; a frozen *teacher* (by default the same text tower as it is before
training, or a separate backbone named in ``teacher_model``) encodes the English (teacher
language) captions of each training image once, before the first step. Each step the student
encodes the batch's captions (any language) and is pulled to the teacher's embedding of the
parallel English caption. The image tower is never touched, so the student lands in the space
the image tower already shares with the teacher. Training data: ``data.train`` (plus
``data.train_extra``) give images with captions in the student languages (an English caption is
a student input too); ``method.teacher_data`` gives the same images' teacher-language captions,
matched by image path. A student caption that is itself one of the image's teacher captions is
pulled to its own teacher embedding; any other caption to the normalised mean of the image's
teacher embeddings (Multi30k translates one of the five English captions, and which one is not
recorded). Features are compared L2-normalised (the space retrieval uses): ``distance: mse``
(mean squared error, as M-CLIP) or ``cosine`` (1 - cosine).

``one_to_k`` (Nie et al., KDD 2024): each image is contrasted with its K parallel captions in K
languages at once (:class:`~domainclip.core.losses.OneToKLoss`); ``parallel_data`` lists one data
source per language (captions matched to the training images by path). Trainable parts as the
``full`` method (``lock_image`` / ``lock_text``...).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import config as config_lib
from ..backbones import ModelConfig, create_backbone
from ..backbones.base import Backbone
from ..data.dataset import derive_seed
from ..data.coverage import tokenizer_coverage
from ..data.sources import DataSourceConfig, load_records
from ..distributed import world_info
from ..encode import model_device
from ..eval.zeroshot import encode_texts
from ..losses import ClipLoss, OneToKLoss
from .base import AdaptationMethod, MethodConfig, TaskInfo, register_method
from .full import FullConfig, FullFineTune

DISTANCES = ("mse", "cosine")


def image_key(path: str) -> str:
    """Images are matched across data sources by their normalised absolute path."""
    return os.path.abspath(os.path.normpath(path))


def captions_by_image(source: DataSourceConfig, what: str) -> dict[str, list[str]]:
    """``{image key: captions}`` of a data source (several records of one image are merged)."""
    merged: dict[str, list[str]] = {}
    for record in load_records(source).records:
        merged.setdefault(image_key(record.image), []).extend(record.captions)
    if not merged:
        raise ValueError(f"{what} ({source.path}) has no records")
    return merged


def training_records(loader: Any) -> list[Any]:
    """The records behind a map-style training loader (cross-lingual methods need their paths)."""
    records = getattr(getattr(loader, "dataset", None), "records", None)
    if records is None:
        raise ValueError("cross-lingual methods need a map-style data.train (records with image paths), "
                         "not a webdataset stream")
    return list(records)


def text_features(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Normalised text features of the batch's captions, gradients kept.

    A DDP-wrapped model goes through its forward (so gradients are synchronised; the frozen image
    tower runs too); a single process encodes only the text.
    """
    if hasattr(model, "module"):
        return model(batch["images"], batch["tokens"])["text_features"]
    return model.encode_text(batch["tokens"], normalize=True)


@dataclass
class TeacherConfig(MethodConfig):
    """Multilingual-CLIP teacher learning (see the module docstring).

    Attributes:
        teacher_data: the teacher-language (English) captions of the training images, e.g.
            ``{format: jsonl, path: captions.jsonl, caption_key: captions.en}``.
        teacher_model: model section of a separate frozen teacher backbone (its text tower is
            used; same embedding size as the student); empty = the backbone's own text tower
            before training.
        distance: ``mse`` or ``cosine`` between normalised student and teacher features.
        projection_only: train only the text tower's head (final norm / projection), not its blocks.
    """

    name: str = "teacher"
    teacher_data: DataSourceConfig = field(default_factory=DataSourceConfig)
    teacher_model: dict[str, Any] = field(default_factory=dict)
    distance: str = "mse"
    projection_only: bool = False

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ValueError(f"method.distance must be one of {DISTANCES}, got {self.distance!r}")


@register_method("teacher", TeacherConfig)
class TeacherLearning(AdaptationMethod):
    cfg: TeacherConfig

    def __init__(self, cfg: TeacherConfig):
        super().__init__(cfg)
        self.targets: torch.Tensor | None = None  # (N records, D): mean teacher feature per record
        self.own: list[dict[str, torch.Tensor]] = []  # per record: teacher caption -> its feature

    def apply(self, model: Backbone, task: TaskInfo | None = None) -> Backbone:
        groups = model.tower_parameter_groups("text")
        trainable = set(groups[-1] if self.cfg.projection_only else [n for g in groups for n in g])
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
        return model

    @property
    def reads_cached_features(self) -> bool:
        return world_info()[1] == 1  # one process encodes text only; DDP needs the forward (images too)

    def prepare_data(self, model: Backbone, loader: Any) -> list[tuple[str, str]]:
        """Encode every training image's teacher captions once with the frozen teacher."""
        if not self.cfg.teacher_data.path:
            raise ValueError("method.teacher_data.path is empty: name the teacher-language (English) captions "
                             "of the training images (e.g. {format: jsonl, caption_key: captions.en})")
        records = training_records(loader)
        report_coverage(model, {"data.train": [c for r in records for c in r.captions]})
        teacher_captions = captions_by_image(self.cfg.teacher_data, "method.teacher_data")
        missing = [r.image for r in records if image_key(r.image) not in teacher_captions]
        if missing:
            raise ValueError(f"{len(missing)} of {len(records)} training images have no caption in method.teacher_data "
                             f"({self.cfg.teacher_data.path}), e.g. {missing[:3]}; images are matched by path")
        keys = list(dict.fromkeys(image_key(r.image) for r in records))
        unique = list(dict.fromkeys(c for key in keys for c in teacher_captions[key]))
        teacher = self._teacher(model)
        features = dict(zip(unique, encode_texts(teacher, unique).cpu()))
        if features[unique[0]].shape[0] != model.embed_dim:
            raise ValueError(f"method.teacher_model embeds in {features[unique[0]].shape[0]} dimensions but the "
                             f"student backbone in {model.embed_dim}")
        targets = []
        self.own = []
        for record in records:
            own = {c: features[c] for c in teacher_captions[image_key(record.image)]}
            self.own.append(own)
            targets.append(F.normalize(torch.stack(list(own.values())).mean(0), dim=-1))
        self.targets = torch.stack(targets)
        return []

    def _teacher(self, model: Backbone) -> Backbone:
        if not self.cfg.teacher_model:
            return model  # called before any step: the text tower is still the original one
        teacher = create_backbone(config_lib.load(ModelConfig, None, (), base=dict(self.cfg.teacher_model)))
        return teacher.to(model_device(model))

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], loss_fn: nn.Module) -> torch.Tensor:
        """Distance between the student's caption features and the teacher's parallel English ones."""
        if self.targets is None:
            raise RuntimeError("teacher: prepare_data was not called before the first step")
        student = text_features(model, batch)
        rows = batch["indices"].tolist()
        target = torch.stack([self.own[i].get(c, self.targets[i]) for i, c in zip(rows, batch["captions"])])
        target = target.to(student.device, student.dtype)
        if self.cfg.distance == "cosine":
            return (1.0 - (student * target).sum(-1)).mean()
        return F.mse_loss(student, target)


@dataclass
class OneToKConfig(FullConfig):
    """1-to-K contrastive training (see the module docstring).

    Attributes:
        parallel_data: one data source per extra language with captions of the training images
            (matched by path); with ``data.train``'s own caption that makes K captions per image.
    """

    name: str = "one_to_k"
    parallel_data: list[DataSourceConfig] = field(default_factory=list)


@register_method("one_to_k", OneToKConfig)
class OneToK(FullFineTune):
    cfg: OneToKConfig

    def __init__(self, cfg: OneToKConfig):
        super().__init__(cfg)
        self.parallel: list[list[list[str]]] = []  # per record, per extra language: its captions
        self.loss = OneToKLoss()

    def prepare_data(self, model: Backbone, loader: Any) -> list[tuple[str, str]]:
        if not self.cfg.parallel_data:
            raise ValueError("method.parallel_data is empty: list one data source per extra language")
        records = training_records(loader)
        languages = [captions_by_image(source, f"method.parallel_data.{i}")
                     for i, source in enumerate(self.cfg.parallel_data)]
        report_coverage(model, {"data.train": [c for r in records for c in r.captions],
                                **{f"method.parallel_data.{i} ({source.path})": [c for cs in by_image.values() for c in cs]
                                   for i, (source, by_image) in enumerate(zip(self.cfg.parallel_data, languages))}})
        self.parallel = []
        for record in records:
            key = image_key(record.image)
            missing = [i for i, by_image in enumerate(languages) if key not in by_image]
            if missing:
                raise ValueError(f"training image {record.image} has no caption in method.parallel_data "
                                 f"{missing}; every training image needs one in every language")
            self.parallel.append([by_image[key] for by_image in languages])
        return []

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], loss_fn: nn.Module) -> torch.Tensor:
        """:class:`OneToKLoss` of each image against its K captions (the batch's + one per language)."""
        if not self.parallel:
            raise RuntimeError("one_to_k: prepare_data was not called before the first step")
        if type(loss_fn) is not ClipLoss or loss_fn.label_aware:
            raise ValueError(f"method one_to_k brings its own loss (1-to-K InfoNCE); the recipe's loss section "
                             f"asks for {type(loss_fn).__name__}(label_aware={getattr(loss_fn, 'label_aware', None)}), "
                             f"which it would ignore: use loss: {{name: clip}}")
        rows = batch["indices"].tolist()
        # the extra languages' captions drawn per (epoch, dataset index, language), as the dataset
        # draws data.train's: a resumed run draws the same ones
        texts = [[caption] + [random.Random(derive_seed(self.epoch, i, k)).choice(options)
                              for k, options in enumerate(self.parallel[i])]
                 for i, caption in zip(rows, batch["captions"])]
        count = len(texts[0])
        unwrapped = getattr(model, "module", model)
        flat = [caption for group in texts for caption in group]
        tokens = {k: v.to(batch["images"].device) for k, v in unwrapped.tokenize(flat).items()}
        out = model(batch["images"], tokens)  # B images, B*K captions; under DDP one forward syncs gradients
        scale = unwrapped.logit_scale.exp()
        return self.loss(out["image_features"], out["text_features"].view(len(texts), count, -1), scale)


def report_coverage(model: Backbone, captions: dict[str, list[str]]) -> None:
    """Log the text tower's tokenizer coverage of each caption set and warn where it is poor (a
    tokenizer without an unknown-token notion, such as open_clip's byte-level BPE, is skipped)."""
    try:
        tokenizer_coverage(model, captions)
    except TypeError:  # no Hugging Face tokenizer: nothing becomes [UNK]
        return


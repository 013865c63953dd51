"""Distillation of a frozen CLIP teacher into a smaller student, in the one training loop.

``method: {name: distill, teacher: {run: PATH} | {model: {...}}, ...}``. The recipe's ``model`` is
the *student* (any backbone the kit builds, possibly another family than the teacher); the
*teacher* is a finished run folder (rebuilt as it was trained) or a model section. Each step
minimises

    contrastive_weight * the recipe's loss (the student's own CLIP / SigLIP / FILIP loss)
  + feature_weight     * feature matching (CLIP-KD "FD"): ||t - normalise(P s)||^2 per image and
                         per caption, averaged over the batch
  + affinity_weight    * affinity mimicking (TinyCLIP; open_clip's DistillClipLoss):
                         KL(teacher || student) of the in-batch image->text and text->image
                         similarity distributions (softmax rows), averaged over rows and directions

where ``t`` are the teacher's L2-normalised embeddings, ``s`` the student's, and ``P`` is a learned
linear map (no bias) student dim -> teacher dim, per tower, created only when the dims differ (it
is trained and saved with the student, in ``model/trainable.safetensors``, and plays no part at
inference). The teacher's distributions use its own logit scale, the student's its learned one.

The teacher runs once: before the first step it encodes every training image (the deterministic
evaluation transform: the teacher never sees the student's random crops; a feature computed on
the augmented view would have to be recomputed every epoch) and every caption through the
:class:`~domainclip.core.features.FeatureCache`, so a second run on the same data reads them back.
The teacher is then dropped from memory. Under several processes every term is exact to one
process on the global batch (student features gathered with gradient, scaled as
:class:`~domainclip.core.losses.ClipLoss`).

Loading a *run* as teacher needs the run loader of ``core/train``, which sits above this package;
it registers itself with :func:`set_run_loader` when ``domainclip.core.train`` is imported (the
training loop always is), so this module imports nothing from above.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import config as config_lib
from ..backbones import create_backbone
from ..backbones.base import Backbone
from ..backbones.factory import ModelConfig
from ..distributed import gather_no_grad, gather_with_grad, world_info
from ..encode import model_device
from ..features import FeatureCache
from .base import AdaptationMethod, TaskInfo, contrastive_loss, forward_for_loss, register_method
from .cross_lingual import training_records
from .full import FullConfig, FullFineTune

log = logging.getLogger("domainclip.methods")

PROJECTION = "distill_projection"
_RUN_LOADER: list[Callable[[str], Backbone]] = []


def set_run_loader(loader: Callable[[str], Backbone]) -> None:
    """Install the function that rebuilds a finished run's model (``core/train`` does, on import)."""
    _RUN_LOADER[:] = [loader]


@dataclass
class TeacherSource:
    """The frozen teacher: exactly one of ``run`` or ``model``.

    Attributes:
        run: a finished run folder (``runs/NAME``); its model is rebuilt as it was trained.
        model: a model section, as the recipe's top-level ``model`` (kind, name, pretrained...).
    """

    run: str = ""
    model: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Exactly one source; a model section's keys are checked as the top-level ``model``'s."""
        if bool(self.run) == bool(self.model):
            raise ValueError("method.teacher needs exactly one of 'run' (a finished run folder) or 'model' "
                             f"(a model section), got run={self.run!r} and model={self.model!r}")
        if self.model:
            config_lib.load(ModelConfig, None, (), base=dict(self.model))

    def load(self) -> Backbone:
        """Build the teacher backbone (eval mode, no gradients)."""
        if self.run:
            if not _RUN_LOADER:
                raise RuntimeError("method.teacher.run needs the run loader: import domainclip.core.train first")
            teacher = _RUN_LOADER[0](self.run)
        else:
            teacher = create_backbone(config_lib.load(ModelConfig, None, (), base=dict(self.model)))
        for param in teacher.parameters():
            param.requires_grad_(False)
        return teacher.eval()


@dataclass
class DistillConfig(FullConfig):
    """Distil a frozen teacher into the recipe's model (the student); trainable parts as ``full``.

    Attributes:
        teacher: where the teacher comes from (``{run: PATH}`` or ``{model: {...}}``).
        contrastive_weight: weight of the recipe's ``loss`` on the student alone.
        feature_weight: weight of feature matching (squared distance of normalised embeddings).
        affinity_weight: weight of the KL between teacher and student in-batch similarity
            distributions.
        cache_dir: feature cache folder for the teacher's embeddings (empty = ``$DOMAINCLIP_CACHE``
            or ``~/.cache/domainclip/features``).
        teacher_batch_size: images per batch when the teacher encodes the training set.
    """

    name: str = "distill"
    teacher: TeacherSource = field(default_factory=TeacherSource)
    contrastive_weight: float = 1.0
    feature_weight: float = 1.0
    affinity_weight: float = 1.0
    cache_dir: str = ""
    teacher_batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        self.teacher.check()
        weights = {key: getattr(self, key) for key in ("contrastive_weight", "feature_weight", "affinity_weight")}
        if any(value < 0 for value in weights.values()) or not any(weights.values()):
            raise ValueError(f"method weights must be >= 0 and not all 0, got {weights}")
        if self.teacher_batch_size < 1:
            raise ValueError(f"method.teacher_batch_size must be >= 1, got {self.teacher_batch_size}")


@dataclass
class TeacherTargets:
    """The teacher's normalised embeddings of the training set, looked up per batch."""

    images: torch.Tensor  # (N records, D)
    present: torch.Tensor  # (N,) bool: the teacher could read the image
    caption_rows: dict[str, int]
    texts: torch.Tensor  # (captions, D)
    logit_scale: float

    def lookup(self, indices: torch.Tensor, captions: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        indices = indices.cpu()
        if not bool(self.present[indices].all()):
            missing = indices[~self.present[indices]].tolist()
            raise ValueError(f"method distill: the teacher could not read training items {missing[:5]}")
        unknown = [c for c in captions if c not in self.caption_rows]
        if unknown:
            raise ValueError(f"method distill: captions without a teacher embedding, e.g. {unknown[:2]}")
        texts = self.texts[[self.caption_rows[c] for c in captions]]
        return self.images[indices].to(device), texts.to(device)


@register_method("distill", DistillConfig)
class Distill(FullFineTune):
    cfg: DistillConfig
    training_only_prefixes = (f"{PROJECTION}.",)  # the student -> teacher maps

    def __init__(self, cfg: DistillConfig):
        super().__init__(cfg)
        self.targets: TeacherTargets | None = None

    @property
    def supports_token_losses(self) -> bool:
        return True  # the student's own loss goes through forward_for_loss / contrastive_loss

    def prepare_data(self, model: Backbone, loader: Any) -> list[tuple[str, str]]:
        """Encode the training set with the teacher once (through the feature cache); add ``P`` if needed."""
        records = training_records(loader)
        device = model_device(model)
        # a cold cache draws random numbers (loader seeds) that a warm one does not: keep the
        # global RNG out of it, so the run (projection init, data order) does not depend on the cache
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.targets, bad = self._encode_with_teacher(records, device, getattr(loader, "num_workers", 0))
        teacher_dim = self.targets.images.shape[1]
        if teacher_dim != model.embed_dim and not hasattr(model, PROJECTION):
            add_projection(model, model.embed_dim, teacher_dim)
        return bad

    def _encode_with_teacher(self, records: list[Any], device: torch.device,
                             num_workers: int) -> tuple[TeacherTargets, list[tuple[str, str]]]:
        teacher = self.cfg.teacher.load().to(device)
        cache = FeatureCache(self.cfg.cache_dir or None)
        images = cache.image_features(teacher, records, batch_size=self.cfg.teacher_batch_size, num_workers=num_workers)
        table, present = images.dense(len(records))
        captions = list(dict.fromkeys(c for record in records for c in record.captions))
        texts = cache.text_features(teacher, captions) if captions else torch.zeros(0, table.shape[1])
        log.info("method distill: teacher embeddings of %d images (%d encoded, %d read back, %d bad) and %d captions",
                 len(records), images.computed, images.reused, len(images.bad), len(captions))
        targets = TeacherTargets(table, present, {c: i for i, c in enumerate(captions)}, texts,
                                 float(teacher.logit_scale.exp()))
        return targets, images.bad  # the teacher itself is dropped here: it never runs again

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], loss_fn: nn.Module) -> torch.Tensor:
        if self.targets is None:
            raise RuntimeError("distill: prepare_data was not called before the first step")
        out = forward_for_loss(model, batch, loss_fn)
        loss = self.cfg.contrastive_weight * contrastive_loss(out, batch, loss_fn) if self.cfg.contrastive_weight else 0.0
        device = out["image_features"].device
        # the teacher saw the un-augmented image, so its text target is the caption before any rewrite
        captions = batch.get("source_captions", batch["captions"])
        teacher_images, teacher_texts = self.targets.lookup(batch["indices"], list(captions), device)
        student_images, student_texts = out["image_features"], out["text_features"]
        projection = getattr(model.module if hasattr(model, "module") else model, PROJECTION, None)
        if projection is not None:
            student_images = F.normalize(projection["image"](student_images), dim=-1)
            student_texts = F.normalize(projection["text"](student_texts), dim=-1)
        if self.cfg.feature_weight:
            loss = loss + self.cfg.feature_weight * feature_matching_loss(
                student_images, student_texts, teacher_images.to(student_images.dtype),
                teacher_texts.to(student_texts.dtype))
        if self.cfg.affinity_weight:
            loss = loss + self.cfg.affinity_weight * affinity_loss(
                out["image_features"], out["text_features"], out["logit_scale"], teacher_images, teacher_texts,
                self.targets.logit_scale)
        return loss

    def plain_backbone(self, model: Backbone) -> Backbone:
        """The student alone: the training-only projection to the teacher's width is dropped."""
        if hasattr(model, PROJECTION):
            delattr(model, PROJECTION)
        return model

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> None:
        """Recreate the student -> teacher projection from the saved shapes before loading."""
        weight = state.get(f"{PROJECTION}.image.weight")
        if weight is not None and not hasattr(model, PROJECTION):
            add_projection(model, weight.shape[1], weight.shape[0])
        super().load_trainable_state(model, state, source)


def add_projection(model: nn.Module, student_dim: int, teacher_dim: int) -> None:
    """Attach the learned linear maps (student dim -> teacher dim, per tower) as ``model.distill_projection``."""
    param = next(model.parameters())
    heads = nn.ModuleDict({tower: nn.Linear(student_dim, teacher_dim, bias=False) for tower in ("image", "text")})
    model.add_module(PROJECTION, heads.to(param.device, param.dtype))


def feature_matching_loss(student_images: torch.Tensor, student_texts: torch.Tensor, teacher_images: torch.Tensor,
                          teacher_texts: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of each pair's image and text embeddings to the teacher's, summed over the
    two towers and averaged over the global batch (this process's share, exact under DDP)."""
    _, world_size = world_info()
    global_size = int(gather_no_grad(torch.tensor([student_images.shape[0]], device=student_images.device))[0].sum())
    summed = ((student_images - teacher_images) ** 2).sum() + ((student_texts - teacher_texts) ** 2).sum()
    return summed * (world_size / global_size)


def affinity_loss(student_images: torch.Tensor, student_texts: torch.Tensor, student_scale: torch.Tensor | float,
                  teacher_images: torch.Tensor, teacher_texts: torch.Tensor, teacher_scale: float) -> torch.Tensor:
    """KL(teacher || student) of the in-batch similarity rows, both directions, mean over rows and directions.

    This process scores its own rows against the gathered global batch (student features gathered
    with gradient), scaled as :class:`~domainclip.core.losses.ClipLoss` with ``local_loss``.
    """
    _, world_size = world_info()
    all_student_images, _ = gather_with_grad(student_images)
    all_student_texts, _ = gather_with_grad(student_texts)
    all_teacher_images, _ = gather_no_grad(teacher_images)
    all_teacher_texts, _ = gather_no_grad(teacher_texts)
    summed = student_images.new_zeros(())
    for own_student, other_student, own_teacher, other_teacher in (
            (student_images, all_student_texts, teacher_images, all_teacher_texts),
            (student_texts, all_student_images, teacher_texts, all_teacher_images)):
        student_log_p = F.log_softmax(student_scale * own_student @ other_student.T, dim=1)
        dtype = torch.promote_types(student_log_p.dtype, torch.float32)  # teacher rows in at least fp32
        teacher_log_p = F.log_softmax(teacher_scale * own_teacher.to(dtype) @ other_teacher.to(dtype).T, dim=1)
        summed = summed + F.kl_div(student_log_p, teacher_log_p.to(student_log_p.dtype), log_target=True,
                                   reduction="sum")
    return summed * (world_size / all_student_images.shape[0] / 2)

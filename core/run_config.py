"""The recipe schema: one dataclass per section, every field documented."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .backbones.factory import ModelConfig
from .data.sources import DataSourceConfig
from .encode import check_precision
from .eval.groups import GroupEvalConfig
from .eval.retrieval import RerankConfig
from .losses import LossConfig
from .methods.base import MethodConfig
from .methods.full import FullConfig
from .robustness.config import RobustnessConfig
from .token_merging.config import TokenMergingConfig

PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass
class DataConfig:
    """Training data and how it is batched.

    Attributes:
        train: where the training images and captions come from.
        train_extra: more sources concatenated to ``train`` (e.g. two caption data sets); their
            class labels are ignored (captions only).
        batch_size: images per process per step (the global batch is this times the number of
            processes; gradient accumulation does NOT add negatives, see docs/training.md).
        num_workers: data-loader worker processes per training process (kept from one epoch to the next).
        max_bad_fraction: stop with an error once more than this fraction of the training items
            were unreadable (they are skipped, counted and listed in ``bad_inputs.json``).
        crop_scale: area range of the random resized crop used for training augmentation;
            ``[1.0, 1.0]`` disables it: training images are resized and cropped as for evaluation.
        augment: a named training augmentation registered by a domain (``{name: overhead,
            ...options}``, see docs/remote_sensing.md); empty = the default crop of ``crop_scale``.
    """

    train: DataSourceConfig = field(default_factory=DataSourceConfig)
    train_extra: list[DataSourceConfig] = field(default_factory=list)
    batch_size: int = 32
    num_workers: int = 2
    max_bad_fraction: float = 0.01
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    augment: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0 (0 = load in the training process), got {self.num_workers}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")


@dataclass
class TrainConfig:
    """Optimisation and run control.

    Attributes:
        epochs: passes over the training data (ignored when ``max_steps`` is set).
        max_steps: stop after this many optimizer steps (0 = run ``epochs``).
        lr: peak learning rate (AdamW).
        weight_decay: decoupled weight decay; never applied to norms, biases, logit scale/bias.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: linear warm-up steps before the cosine decay.
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
        grad_clip: clip the global gradient norm to this value (0 = off).
        precision: ``auto`` (bf16 autocast where the device computes bf16 fast: CUDA compute
            capability >= 8.0, CPUs with AVX-512 BF16 or AMX; fp32 elsewhere, where bf16 is
            emulated and training can be many times slower), ``no`` (fp32), ``bf16`` (CPU and GPU)
            or ``fp16`` (GPU, with a loss scaler). The run log and ``train_summary.json`` say what
            ``auto`` chose.
        bf16_weights: when training in bf16 (``precision: bf16``, or ``auto`` choosing bf16), hold the matrices (Linear, convolution and
            projection weights) in bf16 and step fp32 master copies of them in the optimizer,
            instead of casting fp32 weights at every call; norms, embeddings and the loss stay
            fp32 and checkpoints are fp32 (``core/train/master_weights.py``).
        grad_accum: micro-batches per optimizer step.
        grad_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        cpu_kernels: on CPU, run short attention that needs gradients and ViT patch embeddings
            through faster kernels that compute the same thing (``core/train/cpu_kernels.py``);
            ignored on a GPU and with ``grad_checkpointing``. ``false``: torch's defaults.
        seed: seeds model init, data order, caption sampling and augmentation.
        log_every: log loss, learning rate and throughput every N steps.
        save_every: write a checkpoint every N steps (0 = only at the end).
        keep_checkpoints: finished checkpoints kept on disk (older ones are deleted).
        resume: ``auto`` (continue from the run folder's latest checkpoint if any), ``never``, or
            the path of a checkpoint folder.
        cpu: train on the CPU even if a GPU is present.
        tensorboard: write TensorBoard logs to ``RUN/logs``.
        progress: show a progress bar (loss, samples/s, ETA) on the main process.
        eval_every: run the ``eval`` tasks every N steps as well as at the end (0 = end only).
        cache_text_features: when the text tower is frozen (and the method keeps the contrastive
            objective), encode each distinct caption once and reuse its features (frozen towers run
            in eval mode; a caption is encoded in the batch it first appears in, so a resumed run
            may differ from an uninterrupted one in the last bits, about 1e-7: turn it off for
            bit-exact resume).
    """

    epochs: int = 1
    max_steps: int = 0
    lr: float = 5e-5
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    precision: str = "auto"
    bf16_weights: bool = False
    grad_accum: int = 1
    grad_checkpointing: bool = False
    cpu_kernels: bool = True
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: str = "auto"
    cpu: bool = False
    tensorboard: bool = True
    progress: bool = True
    eval_every: int = 0
    cache_text_features: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.bf16_weights and self.precision not in ("bf16", "auto"):
            raise ValueError(f"train.bf16_weights: true needs train.precision: bf16 or auto (got {self.precision!r}):"
                             f" the norms and the loss still run under bf16 autocast")
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr} (the peak learning rate, e.g. 1e-5 for a full "
                             f"fine-tune, 1e-4 for LoRA)")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("train.epochs or train.max_steps must be >= 1")
        for name in ("epochs", "max_steps", "save_every", "eval_every", "keep_checkpoints", "weight_decay", "eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ValueError(f"train.log_every must be >= 1 (log every N optimizer steps), got {self.log_every}")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {self.betas}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be between 0 and 1 (the final lr as a share of train.lr), "
                             f"got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0 = no clipping), got {self.grad_clip}")


EVAL_TASKS = ("zeroshot", "retrieval", "robustness")


@dataclass
class EvalTaskConfig:
    """One evaluation run after (and optionally during) training.

    Attributes:
        name: data set name used in ``metrics.json`` (e.g. ``rsicd_test``).
        task: ``zeroshot`` (classification with prompt ensembles; needs labels), ``retrieval``
            (image-text retrieval over every caption of each image) or ``robustness`` (clean, PGD
            and corrupted numbers side by side; see ``robustness``).
        data: the evaluation split.
        templates: prompt templates for zeroshot (default: ``data.templates``).
        batch_size: images per evaluation batch.
        retention: also evaluate the base model before training and report the change, so you
            see what the domain model forgot on a reference task (WiSE-FT wins it back).
        groups: zeroshot only: also report group-level metrics (records need a group id, e.g.
            the CT volume of each slice); off while ``groups.aggregate`` is empty.
        robustness: task ``robustness`` only: what is attacked (``target``), the PGD radii and
            steps, the corruption set (its own section below).
        rerank: retrieval only: re-rank each query's top k by a finer score
            (``{name: filip, k: 50}``: FILIP late interaction of the token features).
        precision: dtype the frozen weights are held in while encoding: ``auto`` (bf16 where the
            device computes bf16 fast: CUDA compute capability >= 8.0, CPUs with AVX-512 BF16 or
            AMX; fp32 elsewhere), ``fp32``, ``bf16`` or ``fp16``. Independent of
            ``train.precision``; ``metrics.json`` records the resolved one per task.
        refine_ties: zeroshot only: re-encode in fp32 the images whose bf16 / fp16 top-1 decision is
            near a tie (``core/eval/tie_refine.py``), so the decisions are fp32's at close to bf16's
            speed; ``metrics.json`` counts the re-encoded images under ``tie_refinement``. No effect
            when ``precision`` resolves to fp32.
    """

    name: str = ""
    task: str = "zeroshot"
    data: DataSourceConfig = field(default_factory=DataSourceConfig)
    templates: list[str] = field(default_factory=list)
    batch_size: int = 64
    retention: bool = False
    groups: GroupEvalConfig = field(default_factory=GroupEvalConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    precision: str = "auto"
    refine_ties: bool = False

    def __post_init__(self) -> None:
        check_precision(self.precision, f"eval task {self.name!r}: precision")
        if self.refine_ties and self.task != "zeroshot":
            raise ValueError(f"eval task {self.name!r}: refine_ties re-decides classification near ties and needs "
                             f"task 'zeroshot', got {self.task!r}")
        if self.task not in EVAL_TASKS:
            raise ValueError(f"eval task must be one of {EVAL_TASKS}, got {self.task!r}")
        if self.groups.aggregate and self.task != "zeroshot":
            raise ValueError(f"eval task {self.name!r}: groups (group-level metrics) needs task 'zeroshot', "
                             f"got {self.task!r}")
        if self.task != "robustness" and self.robustness != RobustnessConfig():
            raise ValueError(f"eval task {self.name!r}: a robustness section needs task 'robustness', got {self.task!r}")
        if self.task == "robustness" and self.retention:
            raise ValueError(f"eval task {self.name!r}: retention compares one headline number; use task "
                             f"'zeroshot' or 'retrieval' for it (robustness reports several conditions)")
        if self.rerank.name and self.task != "retrieval":
            raise ValueError(f"eval task {self.name!r}: rerank needs task 'retrieval', got {self.task!r}")


@dataclass
class RunConfig:
    """A whole recipe: model, adaptation method, data, loss, training and evaluation.

    Attributes:
        name: run name; the run folder is ``output_dir/name``.
        output_dir: parent folder of run folders.
        model: backbone and weights.
        method: adaptation method and its settings (``name`` picks it).
        data: training data.
        loss: contrastive objective.
        train: optimisation and run control.
        eval: evaluation tasks run at the end of training (and by ``domainclip eval``).
        token_merging: merge image tokens in the image tower (ToMe / PiToMe) wherever images are
            encoded for evaluation, and during training when ``token_merging.train`` is set.
    """

    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=FullConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: list[EvalTaskConfig] = field(default_factory=list)
    token_merging: TokenMergingConfig = field(default_factory=TokenMergingConfig)

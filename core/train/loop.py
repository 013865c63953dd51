"""The one training loop, on Accelerate, for every adaptation method.

Single process, several GPUs and several nodes all run this code (``accelerate launch`` sets up the
processes). A method only decides what is trainable and what is saved; data, loss, precision,
accumulation, checkpointing, logging and evaluation are the same for all of them.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch.utils.data import DataLoader

from .. import config as config_lib
from ..backbones import Backbone, create_backbone
from ..backbones.factory import resolve_model_input
from ..checkpoint import require_safetensors
from ..data.bad_inputs import BadInputReport, check_paths_exist
from ..data.dataset import Collator, ImageTextDataset
from ..data.sources import STREAM_FORMATS, DataSourceConfig, load_records
from ..data.webdataset import build_webdataset
from ..eval import read_metrics
from ..data.transforms import build_image_transform, build_train_transform
from ..distributed import warn_launch_mismatch
from ..encode import cpu_has_fast_bf16, resolve_precision
from ..losses import build_loss
from .cpu_kernels import cpu_training_kernels
from .speed import tune_cpu_allocator, tune_cuda_kernels
from .worker_memory import release_trainer_tensors_in_workers
from ..data.records import ImageTextRecord, RecordSet
from ..methods import AdaptationMethod, TaskInfo
from ..run_config import RunConfig
from ..token_merging import apply_token_merging, refuse_unmergeable
from .checkpointing import (TrainerState, gather_bad_reports, load_training_checkpoint, resolve_resume,
                            save_training_checkpoint)
from .evaluation import add_retention, run_eval_tasks
from .master_weights import MasterWeights
from .frozen import TextFeatureCache, frozen_towers, set_frozen_towers_eval, uses_text_cache
from .optim import build_optimizer, cosine_with_warmup
from .run_folder import RunFolder
from .run_loading import build_model
from .sampler import EpochSampler

log = logging.getLogger("domainclip.train")


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    run_dir: Path
    global_step: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    trainable_parameters: int = 0
    train_seconds: float = 0.0
    samples_per_second: float = 0.0


def load_train_records(cfg: RunConfig) -> RecordSet | None:
    """``data.train`` plus ``data.train_extra`` (captions only), or None for a stream."""
    if cfg.data.train.format in STREAM_FORMATS:
        if cfg.data.train_extra:
            raise ValueError("data.train_extra cannot be combined with a webdataset data.train")
        return None
    records = load_records(cfg.data.train)
    _check_images_exist(records, cfg.data.train, "data.train", cfg.data.max_bad_fraction)
    for number, extra in enumerate(cfg.data.train_extra):
        more = load_records(extra)
        _check_images_exist(more, extra, f"data.train_extra[{number}]", cfg.data.max_bad_fraction)
        records.records += [ImageTextRecord(r.image, r.captions, -1) for r in more.records]
        records.skipped += more.skipped
    return records


def _check_images_exist(records: RecordSet, source: DataSourceConfig, key: str, max_fraction: float) -> None:
    root = source.image_root or f"{Path(source.path).parent} (the manifest's folder, as {key}.image_root is empty)"
    check_paths_exist([r.image for r in records.records], max_fraction, f"{key} ({source.path})", root,
                      f"{key}.image_root")


def task_of(cfg: RunConfig, records: RecordSet) -> TaskInfo:
    """The training task a method sees: class names and templates of labelled data."""
    return TaskInfo(list(records.class_names), list(cfg.data.train.templates) if records.class_names else [])


def build_train_loader(cfg: RunConfig, model: Backbone, records: RecordSet, shuffle: bool = True,
                       augment: bool = True) -> tuple[DataLoader, ImageTextDataset]:
    """A map-style loader over ``records`` with per-(seed, epoch) shuffling."""
    scale = tuple(cfg.data.crop_scale)
    transform = (build_train_transform(model.preprocess, cfg.data.augment, scale) if augment
                 else build_image_transform(model.preprocess, train=False))
    dataset = ImageTextDataset(records, transform, seed=cfg.train.seed, train=True)
    if len(dataset) < cfg.data.batch_size:
        raise ValueError(f"data.train ({cfg.data.train.path}) has {len(dataset)} items, fewer than "
                         f"data.batch_size={cfg.data.batch_size}")
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=EpochSampler(len(dataset), seed=cfg.train.seed) if shuffle else None,
        num_workers=cfg.data.num_workers,
        collate_fn=Collator(model.text_tokenizer),
        drop_last=shuffle,
        pin_memory=torch.cuda.is_available(),
        # workers stay up between epochs (they read the epoch from shared memory, SharedEpoch):
        # re-forking them at each epoch's start stalled CPU runs for 11-14 s (docs/benchmarks.md)
        persistent_workers=cfg.data.num_workers > 0,
        # the loader's own generator keeps worker seeding from consuming the global RNG
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    return loader, dataset


class TrainData:
    """The training batches of one run: a map-style data set or a stream of tar shards.

    Map-style loaders go through ``accelerator.prepare`` (Accelerate shards them across
    processes); streams shard themselves by node and worker, so their batches are only moved to
    the device. ``size`` is the data set's length, ``None`` for a stream.
    """

    def __init__(self, cfg: RunConfig, model: Backbone, records: RecordSet | None, accelerator: Accelerator):
        self.accelerator = accelerator
        self.streaming = records is None
        if self.streaming:
            source = cfg.data.train
            if source.num_samples < 1:
                raise ValueError("data.train.num_samples must be set for webdataset training (streams have no length)")
            transform = build_train_transform(model.preprocess, cfg.data.augment, tuple(cfg.data.crop_scale))
            self.dataset = build_webdataset(source, transform, seed=cfg.train.seed,
                                            collate=Collator(model.text_tokenizer), batch_size=cfg.data.batch_size,
                                            train=True, resampled=accelerator.num_processes > 1)
            self.loader = DataLoader(self.dataset, batch_size=None, num_workers=cfg.data.num_workers)
            self.size = None
            self.batches_per_epoch = math.ceil(source.num_samples / (cfg.data.batch_size * accelerator.num_processes))
        else:
            loader, self.dataset = build_train_loader(cfg, model, records)
            self.size = len(self.dataset)
            self.batches_per_epoch = len(loader) // accelerator.num_processes
            self.loader = loader

    def prepare(self) -> None:
        if not self.streaming:
            self.loader = self.accelerator.prepare(self.loader)

    def epoch(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        """The batches of ``epoch`` after the first ``skip`` (a resumed run's position)."""
        self.dataset.set_epoch(epoch)
        if not self.streaming:
            self.loader.set_epoch(epoch)
            yield from (self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader)
            return
        for batch in itertools.islice(self.loader, skip, None):
            yield send_to_device(batch, self.accelerator.device)


def fresh_accelerator(**kwargs: Any) -> Accelerator:
    """An Accelerator with this run's precision even if an earlier run in the process set another.

    Accelerate keeps precision and accumulation state in process-wide singletons; ``compare`` and
    the tests train several recipes in one process. The distributed (partial) state is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(**kwargs)


def train(cfg: RunConfig) -> TrainResult:
    """Run a recipe: build, (resume,) train or fit, checkpoint, evaluate, write the run folder."""
    on_cpu = cfg.train.cpu or not torch.cuda.is_available()
    if on_cpu:
        tune_cpu_allocator()
    else:
        tune_cuda_kernels()
    precision = training_precision(cfg.train.precision, on_cpu)
    accelerator = fresh_accelerator(
        cpu=cfg.train.cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with="tensorboard" if cfg.train.tensorboard else None,
        project_dir=str(Path(cfg.output_dir) / cfg.name / "logs"),
    )
    warn_launch_mismatch(accelerator.num_processes)
    run = RunFolder(Path(cfg.output_dir) / cfg.name, accelerator)
    for key in ("pretrained", "weights", "name", "text", "vision_pretrained"):  # before the run folder is touched
        require_safetensors(getattr(cfg.model, key).removeprefix("local-dir:"), f"model.{key}")
    records = load_train_records(cfg)
    # what model.input computes from the data (band statistics) is saved with the recipe
    cfg = dataclasses.replace(cfg, model=resolve_model_input(cfg.model, records))
    finished_at = run.prepare(cfg)
    if finished_at is not None:
        return _finished_result(run.path, finished_at)
    if cfg.train.precision == "auto":
        run.log(f"train.precision=auto: {precision} on this {'CPU' if on_cpu else 'GPU'}")
    elif precision == "bf16" and on_cpu and not cpu_has_fast_bf16():
        run.say("warning: train.precision=bf16 on a CPU without AVX-512 BF16 / AMX: bf16 is emulated there and "
                "training can be tens of times slower than fp32; use train.precision=auto (or no)",
                level=logging.WARNING)
    try:
        return _train_in(cfg, accelerator, run, records)
    finally:
        run.release()


def training_precision(precision: str, on_cpu: bool) -> str:
    """Accelerate's ``mixed_precision`` for ``train.precision``: ``auto`` is ``bf16`` where the device
    computes bf16 fast (``core/encode.py``'s rule) and ``no`` (fp32) elsewhere."""
    if precision != "auto":
        return precision
    return "bf16" if resolve_precision("auto", "cpu" if on_cpu else "cuda") == "bf16" else "no"


def _finished_result(run_dir: Path, step: int) -> TrainResult:
    """What a finished run left behind, read (not rewritten) from its folder."""
    summary = json.loads((run_dir / "train_summary.json").read_text())
    metrics = read_metrics(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else []
    return TrainResult(run_dir, step, metrics, summary.get("trainable_parameters", 0), summary.get("train_seconds", 0.0),
                       summary.get("samples_per_second", 0.0))


def _train_in(cfg: RunConfig, accelerator: Accelerator, run: RunFolder, records: RecordSet | None) -> TrainResult:
    """The body of :func:`train` once the run folder is locked and prepared."""
    set_seed(cfg.train.seed)

    task = task_of(cfg, records) if records is not None else TaskInfo()
    base = create_backbone(cfg.model).to(accelerator.device)
    before = run_eval_tasks(cfg, base, accelerator, method=None, only_retention=True)
    model, method = build_model(cfg, task, base=base)
    if cfg.token_merging.active:  # refused before training, not at the evaluation after it
        refuse_unmergeable(model, f"method {cfg.method.name!r}")
    if cfg.token_merging.train:
        apply_token_merging(model, cfg.token_merging)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    started = time.perf_counter()
    if method.fits_in_closed_form:
        if records is None:
            raise ValueError(f"method {cfg.method.name!r} fits on a data set with a length; "
                             f"data.train.format=webdataset streams have none")
        loader, dataset = build_train_loader(cfg, model, records, shuffle=False, augment=False)
        model = model.to(accelerator.device)
        summary = method.fit(model, loader, task)
        # the images the fit could not read: counted, listed in bad_inputs.json and held to
        # data.max_bad_fraction, as the SGD loop does
        bad = BadInputReport.from_items(summary.pop("bad", []), seen=len(dataset), total=len(dataset))
        state, samples = TrainerState(), len(dataset)
        trainable = method.trainable_parameter_count(model)
        run.log(f"method={cfg.method.name} fitted in closed form: {summary}")
        bad.check(cfg.data.max_bad_fraction, total=len(dataset))
        unwrapped = model
    else:
        unwrapped, state, bad, samples = _sgd(cfg, accelerator, run, model, method, records)
        trainable = method.trainable_parameter_count(unwrapped)  # prepare_data may have created some
    train_seconds = time.perf_counter() - started

    run.save_model(unwrapped, method, cfg, task, state.global_step)
    run.write_bad_inputs(bad, skipped_records=records.skipped if records is not None else [])
    metrics = run_eval_tasks(cfg, unwrapped, accelerator, step=state.global_step, method=method)
    add_retention(metrics, before, cfg.eval)
    throughput = samples / max(train_seconds, 1e-9)
    run.write_metrics(metrics, extra={"method": cfg.method.name, "trainable_parameters": trainable,
                                      "train_seconds": train_seconds, "samples_per_second": throughput,
                                      "precision": accelerator.mixed_precision,
                                      "device": accelerator.device.type,
                                      "global_step": state.global_step})
    accelerator.end_training()
    return TrainResult(run.path, state.global_step, metrics, trainable, train_seconds, throughput)


def _sgd(cfg: RunConfig, accelerator: Accelerator, run: RunFolder, model: Backbone, method: AdaptationMethod,
         records: RecordSet | None) -> tuple[Backbone, TrainerState, BadInputReport, int]:
    """Optimizer steps until ``total_steps``, with accumulation, checkpoints, logs and resume."""
    data = TrainData(cfg, model, records, accelerator)
    loss_fn = build_loss(cfg.loss)
    token_loss = getattr(loss_fn, "needs_tokens", False)
    if token_loss and not method.supports_token_losses:
        raise ValueError(f"loss.name={cfg.loss.name!r} needs token features, but method {cfg.method.name!r} computes "
                         f"its own loss without them; use it with a method that trains a tower (full, lora)")
    steps_per_epoch = data.batches_per_epoch // cfg.train.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"one epoch of data.train has {data.batches_per_epoch} batches per process: "
                         f"fewer than train.grad_accum={cfg.train.grad_accum}")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    unreadable = method.prepare_data(model, data.loader)
    if method.reads_cached_features and not data.streaming:
        data.dataset.load_images = False  # the method reads cached features; decoding would be wasted
    # a token-level loss needs the text tokens, not only the cached pooled features
    cache_text = cfg.train.cache_text_features and uses_text_cache(model, method) and not token_loss
    optimizer, masters, stepped = _optimizer(cfg, run, model, method, cache_text, accelerator.mixed_precision)
    full_precision = masters.full_precision if masters is not None else nullcontext
    scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_steps, total_steps, cfg.train.min_lr_ratio)
    run.log(f"method={cfg.method.name} trainable parameters={method.trainable_parameter_count(model):,} "
            f"steps={total_steps} global batch={cfg.data.batch_size * accelerator.num_processes} "
            f"processes={accelerator.num_processes}")

    # The scheduler is stepped by hand once per optimizer step (Accelerate would step a prepared
    # scheduler once per process, but total_steps already counts global optimizer steps).
    model, optimizer = accelerator.prepare(model, optimizer)
    data.prepare()
    state = TrainerState()
    bad = BadInputReport(total=data.size)
    resume_from = resolve_resume(cfg.train.resume, run.checkpoints)
    if resume_from is not None:
        with full_precision():
            state = load_training_checkpoint(resume_from, accelerator, model, method, optimizer, scheduler, bad)
        run.say(f"resumed from step {state.global_step} ({resume_from})")
    resumed_at = state.global_step
    if release_trainer_tensors_in_workers(data.loader, model, optimizer):
        run.log("data workers (forked) drop their inherited copy of the weights and optimizer state")
    if cfg.train.warmup_steps >= total_steps:
        run.say(f"warning: train.warmup_steps={cfg.train.warmup_steps} is at or past the {total_steps} total steps, "
                f"so the learning rate never reaches train.lr={cfg.train.lr}; lower train.warmup_steps",
                level=logging.WARNING)
    if resume_from is None and accelerator.is_main_process:
        # found while caching (every process found the same; a checkpoint already holds them);
        # the batches no longer open these files
        for path, reason in unreadable:
            bad.add_bad(path, reason)
    # steps after the checkpoint were logged by the killed run and are logged again now: drop them
    run.truncate_metrics(state.global_step)
    if cfg.train.tensorboard:
        accelerator.init_trackers("train", init_kwargs={"tensorboard": {"purge_step": state.global_step + 1}})

    unwrapped: Backbone = accelerator.unwrap_model(model)
    towers = frozen_towers(unwrapped)
    text_cache = TextFeatureCache(unwrapped) if cache_text else None
    if towers:
        run.log(f"frozen towers (eval mode): {towers}; cached text features: {text_cache is not None}")

    def train_mode() -> None:
        model.train()
        set_frozen_towers_eval(unwrapped, towers)

    def checkpoint() -> None:
        with full_precision():
            save_training_checkpoint(run.checkpoints, state, accelerator, model, method, optimizer, scheduler,
                                     bad, keep=cfg.train.keep_checkpoints)

    cpu_kernels = accelerator.device.type == "cpu" and cfg.train.cpu_kernels and not cfg.train.grad_checkpointing
    if accelerator.device.type == "cpu":
        # activation checkpointing recomputes the forward outside the kernels' TorchFunctionMode
        run.log("CPU kernels: short attention with gradients, patch embeddings as matrix products" if cpu_kernels
                else "CPU kernels: torch's defaults (" + ("train.grad_checkpointing)" if cfg.train.grad_checkpointing
                                                          else "train.cpu_kernels=false)"))
    progress = run.progress_bar(total_steps, state.global_step, enabled=cfg.train.progress)
    started, samples = time.perf_counter(), 0
    waits = DataWaits()
    train_mode()
    while state.global_step < total_steps:
        for batch in waits.timed(data.epoch(state.epoch, state.batches_in_epoch)):
            state.batches_in_epoch += 1
            if state.batches_in_epoch > steps_per_epoch * cfg.train.grad_accum:
                # fewer than grad_accum batches left: no full step (Accelerate would step on them at
                # the loader's end with 1/grad_accum weight each, and the epochs would run short);
                # left out this epoch, as a loader drops its last partial batch
                continue
            bad.add_batch(batch)
            bad.check(cfg.data.max_bad_fraction, total=data.size)
            if len(batch["indices"]) == 0 and accelerator.num_processes == 1:
                continue  # every item of this batch was unreadable (counted above)
            if text_cache is not None:
                batch["text_features"] = text_cache(batch["captions"], accelerator.device)
            with accelerator.accumulate(model):
                with cpu_training_kernels(cpu_kernels):
                    method.epoch = state.epoch
                    loss = method.compute_loss(model, batch, loss_fn)
                    accelerator.backward(loss)
                if masters is not None and accelerator.sync_gradients:
                    masters.collect_grads()  # micro-batches accumulate in the bf16 gradients, as DDP reduces them
                if accelerator.sync_gradients and cfg.train.grad_clip > 0:
                    accelerator.clip_grad_norm_(stepped, cfg.train.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                    if masters is not None:
                        masters.push()
                optimizer.zero_grad(set_to_none=True)
            samples += len(batch["indices"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if unwrapped.logit_scale.requires_grad:  # a frozen temperature (e.g. SigLIP's 117) stays as it is
                with torch.no_grad():
                    unwrapped.logit_scale.clamp_(0, math.log(100))
            state.global_step += 1
            log_now = state.global_step % cfg.train.log_every == 0 or state.global_step == total_steps
            progress.update(1)
            if log_now:  # reading the loss waits for the GPU: only where it is logged
                throughput = samples / max(time.perf_counter() - started, 1e-9)
                # each process holds its share of the global loss; the mean over processes is the loss
                global_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
                progress.set_postfix(loss=f"{global_loss:.4f}", samples_per_s=f"{throughput:.1f}")
                values = {"train/loss": global_loss, "train/lr": cfg.train.lr * scheduler.lr_lambdas[0](scheduler.last_epoch),
                          "train/logit_scale": unwrapped.logit_scale.exp().item(), "train/samples_per_s": throughput,
                          "train/data_wait_s": waits.since_last_read()}
                accelerator.log(values, step=state.global_step)
                run.log_metrics(state.global_step, values)
                _check_bad_inputs_of_all_processes(bad, accelerator, cfg.data.max_bad_fraction, data.size)
            finished = state.global_step >= total_steps
            if cfg.train.save_every and state.global_step % cfg.train.save_every == 0 and not finished:
                checkpoint()
            if cfg.train.eval_every and state.global_step % cfg.train.eval_every == 0 and not finished:
                with full_precision():
                    run.log_evaluation(run_eval_tasks(cfg, unwrapped, accelerator, step=state.global_step,
                                                      method=method))
                train_mode()
            if finished:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()
    _check_bad_inputs_of_all_processes(bad, accelerator, cfg.data.max_bad_fraction, data.size)
    run.log(f"waited {waits.total:.1f} s for data in {time.perf_counter() - started:.1f} s of training")
    if resume_from is None or state.global_step != resumed_at:  # a rerun of a finished loop saves nothing new
        checkpoint()
    if masters is not None:
        masters.release()
    return unwrapped, state, bad, samples


def _check_bad_inputs_of_all_processes(bad: BadInputReport, accelerator: Accelerator, max_fraction: float,
                                       total: int | None) -> None:
    """``data.max_bad_fraction`` against the bad inputs of all processes together: each process
    checks its own at every batch, but sees only its share of the data, so N processes alone
    would let N times the limit through. Every process gets the same answer, so all stop together."""
    if accelerator.num_processes == 1:
        return
    BadInputReport.merged(gather_bad_reports(bad, accelerator), total).check(max_fraction, total=total)


class DataWaits:
    """Seconds the loop spent waiting for the data loader's next batch.

    Logged as ``train/data_wait_s`` (the wait since the previous log line): a share of the step
    time near 1 means the data workers, not the model, set the pace (add ``data.num_workers``).
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._read = 0.0

    def timed(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        iterator = iter(batches)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.total += time.perf_counter() - asked
            yield batch

    def since_last_read(self) -> float:
        waited, self._read = self.total - self._read, self.total
        return waited


def _optimizer(cfg: RunConfig, run: RunFolder, model: Backbone, method: AdaptationMethod, cache_text: bool,
               accelerator_precision: str) -> tuple[torch.optim.Optimizer, MasterWeights | None, list[torch.Tensor]]:
    """AdamW over the method's groups; with ``train.bf16_weights`` over the fp32 masters of the
    matrices, which are then held in bf16 (before ``prepare``: DDP buckets gradients by dtype).
    Returns the optimizer, the masters (or None) and the tensors it steps (for clipping)."""
    param_groups = method.param_groups(model, cfg.train.lr, cfg.train.weight_decay)
    masters = None
    if cfg.train.bf16_weights and accelerator_precision != "bf16":
        run.log(f"train.bf16_weights ignored: training runs in {accelerator_precision!r} (train.precision="
                f"{cfg.train.precision})")
    elif cfg.train.bf16_weights:
        # a cached text tower runs only to fill the cache, in fp32 as under autocast
        keep = set(model.tower_parameter_names("text")) if cache_text else set()
        masters = MasterWeights(model, keep_fp32=keep)
        param_groups = masters.param_groups(param_groups)
        run.log(f"bf16 weights: {len(masters.names)} matrices in bf16, stepped through fp32 masters")
    optimizer = build_optimizer(param_groups, cfg.train)
    return optimizer, masters, [p for group in param_groups for p in group["params"]]


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Load and validate a recipe with ``a.b=c`` overrides."""
    return config_lib.load(RunConfig, path, overrides)

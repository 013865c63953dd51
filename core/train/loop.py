"""The one training loop, on Accelerate, for every adaptation method.

Single process, several GPUs and several nodes all run this code (``accelerate launch`` sets up the
processes). A method only decides what is trainable and what is saved; data, loss, precision,
accumulation, checkpointing, logging and evaluation are the same for all of them.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from .. import config as config_lib
from ..backbones import Backbone, create_backbone
from ..data.bad_inputs import BadInputReport
from ..data.dataset import Collator, ImageTextDataset
from ..data.sources import load_records
from ..data.transforms import build_image_transform
from ..losses import build_loss
from ..methods import AdaptationMethod, build_method
from ..run_config import RunConfig
from .checkpointing import TrainerState, load_training_checkpoint, resolve_resume, save_training_checkpoint
from .evaluation import run_eval_tasks
from .optim import build_optimizer, cosine_with_warmup
from .run_folder import RunFolder
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


def build_model(cfg: RunConfig) -> tuple[Backbone, AdaptationMethod]:
    """The backbone with the recipe's adaptation method applied."""
    model = create_backbone(cfg.model)
    method = build_method(cfg.method)
    model = method.apply(model)
    return model, method


def build_train_loader(cfg: RunConfig, model: Backbone) -> tuple[DataLoader, ImageTextDataset]:
    records = load_records(cfg.data.train)
    transform = build_image_transform(model.preprocess, train=True, scale=tuple(cfg.data.crop_scale))
    dataset = ImageTextDataset(records, transform, seed=cfg.train.seed, train=True)
    if len(dataset) < cfg.data.batch_size:
        raise ValueError(f"data.train ({cfg.data.train.path}) has {len(dataset)} items, fewer than "
                         f"data.batch_size={cfg.data.batch_size}")
    loader = DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=EpochSampler(len(dataset), seed=cfg.train.seed),
        num_workers=cfg.data.num_workers,
        collate_fn=Collator(model.text_tokenizer),
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        # the loader's own generator keeps worker seeding from consuming the global RNG
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    return loader, dataset


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
    """Run a recipe: build, (resume,) train, checkpoint, evaluate, write the run folder."""
    accelerator = fresh_accelerator(
        cpu=cfg.train.cpu,
        mixed_precision=cfg.train.precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with="tensorboard" if cfg.train.tensorboard else None,
        project_dir=str(Path(cfg.output_dir) / cfg.name / "logs"),
    )
    run = RunFolder(Path(cfg.output_dir) / cfg.name, accelerator)
    run.prepare(cfg)
    set_seed(cfg.train.seed)

    model, method = build_model(cfg)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    loader, dataset = build_train_loader(cfg, model)
    loss_fn = build_loss(cfg.loss)
    steps_per_epoch = len(loader) // (cfg.train.grad_accum * accelerator.num_processes)
    if steps_per_epoch < 1:
        raise ValueError(f"one epoch of data.train has {len(loader)} batches: fewer than grad_accum x processes")
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    optimizer = build_optimizer(method.param_groups(model, cfg.train.lr, cfg.train.weight_decay), cfg.train)
    scheduler = cosine_with_warmup(optimizer, cfg.train.warmup_steps, total_steps, cfg.train.min_lr_ratio)
    trainable = method.trainable_parameter_count(model)
    run.log(f"method={cfg.method.name} trainable parameters={trainable:,} steps={total_steps} "
            f"global batch={cfg.data.batch_size * accelerator.num_processes} processes={accelerator.num_processes}")

    # The scheduler is stepped by hand once per optimizer step (Accelerate would step a prepared
    # scheduler once per process, but total_steps already counts global optimizer steps).
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = TrainerState()
    bad = BadInputReport()
    resume_from = resolve_resume(cfg.train.resume, run.checkpoints)
    if resume_from is not None:
        state = load_training_checkpoint(resume_from, accelerator, model, method, optimizer, scheduler, bad)
        run.log(f"resumed from {resume_from} at step {state.global_step}")
    if cfg.train.tensorboard:
        accelerator.init_trackers("train")

    progress = run.progress_bar(total_steps, state.global_step, enabled=cfg.train.progress)
    started, samples_this_session = time.perf_counter(), 0
    unwrapped: Backbone = accelerator.unwrap_model(model)
    model.train()
    while state.global_step < total_steps:
        loader.set_epoch(state.epoch)
        dataset.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
        for batch in batches:
            state.batches_in_epoch += 1
            bad.add_seen(len(batch["indices"]) + len(batch["bad"]))
            for path, reason in batch["bad"]:
                bad.add_bad(path, reason)
            bad.check(cfg.data.max_bad_fraction, total=len(dataset))
            with accelerator.accumulate(model):
                out = model(batch["images"], batch["tokens"])
                loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                               out["logit_bias"], labels=batch["labels"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            samples_this_session += len(batch["indices"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            with torch.no_grad():
                unwrapped.logit_scale.clamp_(0, math.log(100))
            state.global_step += 1
            elapsed = time.perf_counter() - started
            throughput = samples_this_session / max(elapsed, 1e-9)
            log_now = state.global_step % cfg.train.log_every == 0 or state.global_step == total_steps
            # each process holds its share of the global loss; the mean over processes is the loss
            global_loss = accelerator.reduce(loss.detach(), reduction="mean").item() if log_now else loss.item()
            progress.update(1)
            progress.set_postfix(loss=f"{global_loss:.4f}", samples_per_s=f"{throughput:.1f}")
            if log_now:
                values = {"train/loss": global_loss, "train/lr": scheduler.get_last_lr()[0],
                          "train/logit_scale": unwrapped.logit_scale.exp().item(), "train/samples_per_s": throughput}
                accelerator.log(values, step=state.global_step)
                run.log_metrics(state.global_step, values)
            if cfg.train.save_every and state.global_step % cfg.train.save_every == 0 and state.global_step < total_steps:
                save_training_checkpoint(run.checkpoints, state, accelerator, model, method, optimizer, scheduler, bad,
                                         keep=cfg.train.keep_checkpoints)
            if cfg.train.eval_every and state.global_step % cfg.train.eval_every == 0 and state.global_step < total_steps:
                run_eval_tasks(cfg, unwrapped, accelerator, step=state.global_step)
                model.train()
            if state.global_step >= total_steps:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()
    train_seconds = time.perf_counter() - started

    save_training_checkpoint(run.checkpoints, state, accelerator, model, method, optimizer, scheduler, bad,
                             keep=cfg.train.keep_checkpoints)
    run.save_model(unwrapped, method, cfg)
    run.write_bad_inputs(bad)
    metrics = run_eval_tasks(cfg, unwrapped, accelerator, step=state.global_step)
    run.write_metrics(metrics, extra={"trainable_parameters": trainable, "train_seconds": train_seconds,
                                      "samples_per_second": samples_this_session / max(train_seconds, 1e-9),
                                      "global_step": state.global_step})
    accelerator.end_training()
    return TrainResult(run.path, state.global_step, metrics, trainable, train_seconds,
                       samples_this_session / max(train_seconds, 1e-9))


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Load and validate a recipe with ``a.b=c`` overrides."""
    return config_lib.load(RunConfig, path, overrides)

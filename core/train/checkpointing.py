"""Save and restore the whole training state so a resumed run continues exactly."""
from __future__ import annotations

import os
import signal
from dataclasses import asdict, dataclass
from typing import Any
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file
from torch import nn

from .. import checkpoint as ckpt
from ..data.bad_inputs import BadInputReport
from ..methods import AdaptationMethod


FAULT_ENV = "DOMAINCLIP_FAULT"


def fault_point(name: str, step: int) -> None:
    """SIGKILL this process when ``DOMAINCLIP_FAULT=name:step`` (crash-safety tests only).

    Points: ``mid_save`` (half of checkpoint ``step`` written), ``after_save`` (checkpoint
    ``step`` committed) and ``mid_model_save`` (the final weights written, ``model.json`` not yet). A real SIGKILL: no cleanup, no ``finally``, as a pre-empted job dies.
    """
    if os.environ.get(FAULT_ENV) == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class TrainerState:
    """Where the loop is: optimizer steps done, epoch, batches consumed in that epoch."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


def resolve_resume(resume: str, checkpoints: Path) -> Path | None:
    """``auto`` -> latest finished checkpoint (or none), ``never`` -> none, else that folder."""
    if resume == "never":
        return None
    if resume == "auto":
        return ckpt.latest_checkpoint(checkpoints)
    folder = Path(resume)
    if not (folder / "trainer_state.json").is_file():
        raise FileNotFoundError(f"train.resume={resume!r}: {folder} is not a finished checkpoint folder "
                                f"(no trainer_state.json); use 'auto', 'never' or a checkpoints/step_* folder")
    return folder


def gather_bad_reports(bad: BadInputReport, accelerator: Accelerator) -> list[dict[str, Any]]:
    """Every process's bad-input report (``to_dict()``), in process order. A collective: every
    process must call it."""
    return gather_object([bad.to_dict()]) if accelerator.num_processes > 1 else [bad.to_dict()]


def save_training_checkpoint(root: Path, state: TrainerState, accelerator: Accelerator, model: nn.Module,
                             method: AdaptationMethod, optimizer, scheduler, bad: BadInputReport, keep: int) -> Path:
    """Write checkpoint ``state.global_step`` atomically; every process saves its RNG state."""
    tmp = root / f".tmp-{ckpt.checkpoint_name(state.global_step)}"
    if accelerator.is_main_process:
        ckpt.begin_checkpoint(root, state.global_step)
    accelerator.wait_for_everyone()
    rng_tensors, rng_meta = ckpt.capture_rng()
    rank = accelerator.process_index
    # every process's own report: each resumes its own, and the end of the run merges them once
    reports = gather_bad_reports(bad, accelerator)
    ckpt.save_tensors(rng_tensors, tmp / f"rng_{rank}.safetensors")
    ckpt.write_json(tmp / f"rng_{rank}.json", rng_meta)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        ckpt.save_tensors(method.trainable_state(unwrapped), tmp / "trainable.safetensors")
        tensors, meta = ckpt.optimizer_to_safetensors(optimizer.state_dict())
        ckpt.save_tensors(tensors, tmp / "optimizer.safetensors")
        ckpt.write_json(tmp / "optimizer.json", meta)
        fault_point("mid_save", state.global_step)
        ckpt.write_json(tmp / "scheduler.json", scheduler.state_dict())
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            ckpt.write_json(tmp / "scaler.json", scaler.state_dict())
        merged = BadInputReport.merged(reports, bad.total)
        ckpt.write_json(tmp / "trainer_state.json", {**asdict(state), "bad_inputs": merged.to_dict(),
                                                     "bad_inputs_by_process": reports,
                                                     "num_processes": accelerator.num_processes})
    accelerator.wait_for_everyone()
    final = root / ckpt.checkpoint_name(state.global_step)
    if accelerator.is_main_process:
        ckpt.commit_checkpoint(tmp, state.global_step, keep=keep)
    accelerator.wait_for_everyone()
    fault_point("after_save", state.global_step)
    return final


def load_training_checkpoint(folder: Path, accelerator: Accelerator, model: nn.Module, method: AdaptationMethod,
                             optimizer, scheduler, bad: BadInputReport) -> TrainerState:
    """Restore weights, optimizer, schedule, scaler, RNG and the bad-input report."""
    meta = ckpt.read_json(folder / "trainer_state.json")
    if meta.get("num_processes", 1) != accelerator.num_processes:
        raise ValueError(f"{folder} was written by {meta['num_processes']} processes, this run has "
                         f"{accelerator.num_processes}; exact resume needs the same number")
    method.load_trainable_state(accelerator.unwrap_model(model), load_file(str(folder / "trainable.safetensors")),
                                source=str(folder / "trainable.safetensors"))
    optimizer.load_state_dict(ckpt.optimizer_from_safetensors(load_file(str(folder / "optimizer.safetensors")),
                                                              ckpt.read_json(folder / "optimizer.json")))
    scheduler.load_state_dict(ckpt.read_json(folder / "scheduler.json"))
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and (folder / "scaler.json").is_file():
        scaler.load_state_dict(ckpt.read_json(folder / "scaler.json"))
    rank = accelerator.process_index
    ckpt.restore_rng(load_file(str(folder / f"rng_{rank}.safetensors")), ckpt.read_json(folder / f"rng_{rank}.json"))
    per_process = meta.get("bad_inputs_by_process")
    if per_process is not None:
        bad.merge(BadInputReport.from_dict(per_process[rank]))
    elif accelerator.is_main_process:  # a checkpoint from before per-process reports: the main process's only
        bad.merge(BadInputReport.from_dict(meta["bad_inputs"]))
    return TrainerState(meta["global_step"], meta["epoch"], meta["batches_in_epoch"])

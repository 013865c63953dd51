"""WiSE-FT: interpolate between the base and the fine-tuned weights, pick the mix on validation data.

Wortsman et al. (2022) mix zero-shot and fine-tuned weights as ``(1 - alpha) * base + alpha * ft``;
intermediate alphas often keep most of the fine-tuned accuracy and much of the base model's
robustness. :func:`wise_ft_sweep` rebuilds a finished run, evaluates the run's ``eval`` tasks for
every alpha and keeps the alpha that is best on the validation task ``select_on``.

Where the interpolation happens depends on the method:

- methods whose trained tensors are ordinary weights (``full``, locked towers) interpolate
  their ``trainable_state`` (the untrained value is the freshly built one);
- methods whose trained tensors do not combine linearly provide ``merged_model(model) -> Backbone``
  (LoRA/DoRA): the MERGED fine-tuned backbone is interpolated with the base backbone. For plain
  LoRA this equals scaling the low-rank update ``B @ A`` by alpha; for DoRA it is the true
  weight-space mix, which no single adapter state can express.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbones.base import Backbone
from .checkpoint import atomic_write_text, save_tensors
from .eval.headline import headline
from .plots import plot_wise_ft
from .methods.base import AdaptationMethod, TaskInfo
from .train import build_model, load_trained
from .train.evaluation import run_eval_tasks

DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
RESULT_FILE = "wise_ft.json"
PLOT_FILE = "wise_ft.png"


def interpolate(base_state: Mapping[str, torch.Tensor], finetuned_state: Mapping[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * base + alpha * finetuned`` for every floating tensor (in float32, cast back).

    Uses ``torch.lerp``, which returns ``base`` exactly at alpha 0 and ``finetuned`` exactly at
    alpha 1 (and leaves tensors equal in both unchanged). Both states must have the same keys and
    shapes; non-floating tensors (integer buffers) must be equal and are copied.
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"WiSE-FT alpha must be a number in [0, 1], got {alpha!r}")
    missing, extra = sorted(set(base_state) - set(finetuned_state)), sorted(set(finetuned_state) - set(base_state))
    if missing or extra:
        raise KeyError(f"base and fine-tuned states differ in keys: {len(missing)} only in base (e.g. {missing[:3]}), "
                       f"{len(extra)} only in fine-tuned (e.g. {extra[:3]})")
    mixed: dict[str, torch.Tensor] = {}
    for key, base in base_state.items():
        tuned = finetuned_state[key]
        if base.shape != tuned.shape:
            raise ValueError(f"{key}: base has shape {tuple(base.shape)}, fine-tuned {tuple(tuned.shape)}")
        if base.is_floating_point() and tuned.is_floating_point():
            mixed[key] = torch.lerp(base.float(), tuned.to(base.device).float(), float(alpha)).to(base.dtype)
        elif torch.equal(base, tuned.to(base.device)):
            mixed[key] = base.clone()
        else:
            raise ValueError(f"{key}: {base.dtype} / {tuned.dtype} tensors differ between base and fine-tuned; "
                             f"only floating tensors can be interpolated")
    return mixed


@dataclass
class WeightSpace:
    """What WiSE-FT interpolates for one model, and how to evaluate the result.

    Attributes:
        model: the module the interpolated state is loaded into.
        method: the method evaluation should use (``None`` for a plain, merged backbone).
        state: the tensors to interpolate.
        kind: ``backbone`` (a full backbone state dict) or ``trainable`` (the method's trained state).
    """

    model: nn.Module
    method: AdaptationMethod | None
    state: dict[str, torch.Tensor]
    kind: str

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.kind == "backbone":
            self.model.load_state_dict(dict(state), strict=True)
        else:
            assert self.method is not None
            self.method.load_trainable_state(self.model, dict(state), source="WiSE-FT interpolation")


def weight_space(model: Backbone, method: AdaptationMethod) -> WeightSpace:
    """The space a trained ``model`` is interpolated in (see the module docstring)."""
    merge = getattr(method, "merged_model", None)
    if callable(merge):
        plain = merge(model)
        return WeightSpace(plain, None, {k: v.detach().clone() for k, v in plain.state_dict().items()}, "backbone")
    return WeightSpace(model, method, {k: v.detach().clone() for k, v in method.trainable_state(model).items()}, "trainable")


def retention_ratios(rows: Sequence[Mapping[str, Any]], retention_tasks: Sequence[str]) -> None:
    """Add ``retention`` (task -> score / the base's score) to every row; alpha 0 is the base."""
    base = next((row for row in rows if row["alpha"] == 0.0), None)
    if base is None:
        raise ValueError("retention ratios need the alpha 0 row (the base model)")
    for row in rows:
        row["retention"] = {}
        for task in retention_tasks:
            before = headline(base["tasks"][task])[1]
            after = headline(row["tasks"][task])[1]
            row["retention"][task] = after / before if before > 0 else (1.0 if after >= before else 0.0)


def choose_alpha(rows: Sequence[Mapping[str, Any]], min_retention: float | None = None) -> tuple[float, float]:
    """``(alpha, selection value)`` of the best row; with ``min_retention``, only among rows whose
    every ``retention`` ratio is at least that. Ties go to the smaller alpha (rows are ascending)."""
    best: tuple[float, float] | None = None
    for row in rows:
        if min_retention is not None and any(r < min_retention for r in row.get("retention", {}).values()):
            continue
        if best is None or row["selection_value"] > best[1]:
            best = (row["alpha"], row["selection_value"])
    if best is None:
        raise ValueError(f"no alpha keeps {min_retention:.0%} of the base's score on every retention task")
    return best


def wise_ft_sweep(run_dir: str | Path, alphas: Sequence[float], select_on: str, out_dir: str | Path | None = None,
                  device: str | torch.device | None = None, min_retention: float | None = None) -> dict[str, Any]:
    """Evaluate the run's ``eval`` tasks for each alpha and keep the best alpha on ``select_on``.

    ``alphas``: the mixing weights to try, each in [0, 1] (:data:`DEFAULT_ALPHAS` is 0, 0.1, ..., 1).

    ``select_on`` names one of the run's eval tasks (its ``name``, or its data path when unnamed);
    it should be validation data, not the test set. The chosen weights and ``wise_ft.json`` (all
    tasks for all alphas) go to ``out_dir`` (default ``RUN/wise_ft``), with ``wise_ft.png``, the
    whole curve (the selection metric and each retention task's share of the base's score per
    alpha). Ties go to the smaller alpha (closer to the base model).

    ``min_retention`` (e.g. 0.95): pick the best alpha among those whose ``retention: true`` eval
    tasks keep at least that share of the base model's (alpha 0's) headline score; alpha 0 is
    then always evaluated. Returns the contents of ``wise_ft.json``.
    """
    from accelerate.utils import set_seed

    run_dir = Path(run_dir)
    alphas = _check_alphas(alphas)
    if min_retention is not None:
        if not 0.0 < min_retention <= 1.0:
            raise ValueError(f"min_retention must be in (0, 1] (e.g. 0.95), got {min_retention}")
        alphas = alphas if 0.0 in alphas else [0.0, *alphas]  # the base's own score
    alphas = sorted(alphas)  # ascending, so ties keep the smaller alpha
    finetuned, method, cfg = load_trained(run_dir)
    if not method.interpolates_with_base:
        raise ValueError(f"{run_dir}: method {cfg.method.name!r} fits its weights from the training data, so the "
                         "untrained base has nothing to interpolate them with; WiSE-FT applies to methods that "
                         "fine-tune weights (full, lora, prompt learning, projector, distill...)")
    task_names = [task.name or task.data.path for task in cfg.eval]
    if not task_names:
        raise ValueError(f"{run_dir / 'config.yaml'} has no eval tasks; WiSE-FT picks alpha on a validation eval task")
    if select_on not in task_names:
        raise ValueError(f"select_on={select_on!r} is not an eval task of {run_dir} (tasks: {task_names})")
    retention_tasks = [name for name, task in zip(task_names, cfg.eval) if task.retention]
    if min_retention is not None and not retention_tasks:
        raise ValueError(f"--min-retention needs eval tasks marked 'retention: true' in {run_dir / 'config.yaml'} "
                         f"(tasks: {task_names})")
    info = json.loads((run_dir / "model" / "model.json").read_text())

    tuned = weight_space(finetuned, method)
    del finetuned
    set_seed(cfg.train.seed)  # the same base the run started from, also for randomly initialised weights
    base_model, base_method = build_model(cfg, TaskInfo(**info.get("task", {})))
    base_state = weight_space(base_model, base_method).state
    if method.training_only_prefixes:  # e.g. distill's projection to the teacher: not part of the model
        tuned.state = {k: v for k, v in tuned.state.items() if not k.startswith(method.training_only_prefixes)}
        base_state = {k: v for k, v in base_state.items() if not k.startswith(method.training_only_prefixes)}
    del base_model
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tuned.model.to(device)

    rows = []
    for alpha in alphas:
        tuned.load(interpolate(base_state, tuned.state, alpha))
        records = run_eval_tasks(cfg, tuned.model, accelerator=None, method=tuned.method)
        tasks = {name: {**record, "main_metric": dict([headline(record)])} for name, record in zip(task_names, records)}
        metric, value = headline(tasks[select_on])
        rows.append({"alpha": alpha, "selection_value": value, "tasks": tasks})
    if 0.0 in alphas and retention_tasks:
        retention_ratios(rows, retention_tasks)
    best = choose_alpha(rows, min_retention)
    chosen = best[0]

    out = Path(out_dir) if out_dir is not None else run_dir / "wise_ft"
    out.mkdir(parents=True, exist_ok=True)
    weights_file = out / ("model.safetensors" if tuned.kind == "backbone" else "trainable.safetensors")
    save_tensors(interpolate(base_state, tuned.state, chosen), weights_file,
                 metadata={"format": f"domainclip-wise-ft-{tuned.kind}", "alpha": str(chosen), "run": str(run_dir)})
    summary = {"run": str(run_dir), "method": cfg.method.name, "select_on": select_on, "metric": metric,
               "alphas": alphas, "chosen_alpha": chosen, "chosen_value": best[1], "weights_file": weights_file.name,
               "weights_kind": tuned.kind, "min_retention": min_retention, "retention_tasks": retention_tasks,
               "results": rows}
    atomic_write_text(out / RESULT_FILE, json.dumps(summary, indent=2))
    plot_wise_ft(summary, out / PLOT_FILE)
    return summary


def _check_alphas(alphas: Sequence[float]) -> list[float]:
    values = [float(a) for a in alphas]
    if not values:
        raise ValueError("WiSE-FT needs at least one alpha")
    bad = [a for a in values if not (math.isfinite(a) and 0.0 <= a <= 1.0)]
    if bad:
        raise ValueError(f"WiSE-FT alphas must lie in [0, 1], got {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"WiSE-FT alphas repeat a value: {values}")
    return values

"""What the FILIP and distillation benchmarks share: recipes at a chosen size, seeds, the table."""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from domainclip.core.recipe_files import resolve_recipe
from domainclip.core.run_config import RunConfig
from domainclip.core.train import load_run_config, train
from domainclip.core.eval.headline import headline


def shared_data_present() -> bool:
    """The shared data sets the recipes read (``../shared/data`` or ``$DOMAINCLIP_SHARED_DATA``)."""
    root = Path(os.environ.get("DOMAINCLIP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    return (root / "remote_sensing" / "rsicd").is_dir() and (root / "agriculture" / "plantvillage_apple").is_dir()


def sized_recipe(spec: str, out: Path, name: str, seed: int, steps: int, train_limit: int, eval_limit: int,
                 batch_size: int, cpu: bool, extra: list[str] = (), workers: int = 0) -> RunConfig:
    """A shipped recipe at benchmark size: steps, seed, data limits, batch, data workers, output folder.

    The warm-up is a tenth of the steps: the recipes' warm-up (200 steps, sized for full-length
    runs) would otherwise cover a short benchmark run whole, so the learning rate never peaks.
    """
    overrides = [f"name={name}", f"output_dir={out}", f"train.max_steps={steps}", f"train.seed={seed}",
                 f"train.warmup_steps={max(1, steps // 10)}",
                 "train.progress=false", "train.tensorboard=false", "train.save_every=0", "train.resume=never",
                 f"data.train.limit={train_limit}", f"data.batch_size={batch_size}", f"data.num_workers={workers}"]
    if cpu:
        overrides += ["train.cpu=true", "train.precision='no'"]
    cfg = load_run_config(resolve_recipe(spec), [*overrides, *extra])
    tasks = [dataclasses.replace(t, data=dataclasses.replace(t.data, limit=eval_limit)) for t in cfg.eval]
    return dataclasses.replace(cfg, eval=tasks)


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train and evaluate; the headline metric and every metric of the first eval task."""
    result = train(cfg)
    first = result.metrics[0]
    return {"main": headline(first)[1], "metrics": first["metrics"], "run_dir": str(result.run_dir)}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())

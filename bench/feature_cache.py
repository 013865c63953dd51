"""Feature cache: how much faster the second pass of a frozen-feature method is than the first.

Projector-only alignment, the linear probe and Tip-Adapter all run through ``domainclip``'s one
training loop (``train()``) on the same real images (the PlantVillage apple test split, 318
leaves at 256x256) with an open_clip ViT-B-32 (random init: no download; the towers' cost is the
same as with pretrained weights). Every method starts from an empty feature cache.

* projector (SGD): one run of ``1 + --repeats`` epochs. Epoch 1 is measured from the start of the
  training data's preparation (the frozen towers encode every image and caption into the cache)
  to the end of the epoch; it is compared with the median of the later epochs (the heads train
  on cached features; the loop no longer decodes the images).
* linear probe and Tip-Adapter (closed form, no epochs): a run with an empty cache (its fit
  encodes every image) against the median of ``--repeats`` further runs of the same recipe
  (each builds a new model instance with the same weights and reads the features back). Their
  ``train_seconds`` are compared, and the fit summary's split into feature time and the rest.

An unmeasured small run comes first so that no measured run pays for first-time imports. Each
run uses the loop as a user would; the script only adds timestamps at epoch ends.

    python bench/feature_cache.py                      # 318 images, ViT-B-32, CPU
    python bench/feature_cache.py --images 128 --repeats 5 --json results.json

The first and the later passes cannot alternate (the cache is empty only once); the 1-minute
load average is recorded around each method's runs, and above half the core count (1.0 on 2
cores) nothing is written (exit status 3).

The shared data (``../shared/data`` or ``$DOMAINCLIP_SHARED_DATA``) must hold
``agriculture/plantvillage_apple``; without it the script says so and exits with status 0.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from measure import LoadLog, finish

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["a photo of a {}, a type of apple leaf."]
EPOCH_TIMES: list[tuple[str, float]] = []  # (mark, perf_counter) of the current run, see install_epoch_timer


def shared_data_dir() -> Path:
    """``$DOMAINCLIP_SHARED_DATA`` if set, else ``../shared/data`` beside the repository."""
    env = os.environ.get("DOMAINCLIP_SHARED_DATA")
    return Path(env) if env else REPO_ROOT / ".." / "shared" / "data"


def install_epoch_timer() -> None:
    """Record the wall-clock time of every epoch's batches in ``EPOCH_TIMES`` (the loop logs steps,
    not epochs); ``prepare_start`` marks the start of the training data's preparation."""
    from domainclip.core.train import loop

    class TimedTrainData(loop.TrainData):
        def __init__(self, cfg, model, records, accelerator):
            EPOCH_TIMES.append(("prepare_start", time.perf_counter()))
            super().__init__(cfg, model, records, accelerator)

        def epoch(self, epoch: int, skip: int):
            try:
                yield from super().epoch(epoch, skip)
            finally:  # also when the loop stops mid-generator after its last step
                EPOCH_TIMES.append((f"epoch_{epoch}_end", time.perf_counter()))

    loop.TrainData = TimedTrainData


def recipe(method: dict[str, Any], name: str, out: Path, manifest: Path, images: int, model: str, batch_size: int,
           workers: int, epochs: int) -> dict[str, Any]:
    return {
        "name": name,
        "output_dir": str(out),
        "model": {"kind": "open_clip", "name": model},
        "method": method,
        "data": {"train": {"format": "csv", "path": str(manifest), "image_key": "path", "label_key": "label",
                           "limit": images, "templates": TEMPLATES},
                 "batch_size": batch_size, "num_workers": workers},
        "train": {"epochs": epochs, "lr": 1e-3, "precision": "no", "cpu": True, "log_every": 1, "progress": False,
                  "tensorboard": False, "resume": "never"},
    }


def run_recipe(values: dict[str, Any]):
    from domainclip.core import config as config_lib
    from domainclip.core.run_config import RunConfig
    from domainclip.core.train import train

    EPOCH_TIMES.clear()
    return train(config_lib.load(RunConfig, None, (), base=values))


def later_epochs(count: int) -> list[float]:
    marks = dict(EPOCH_TIMES)
    return [marks[f"epoch_{e}_end"] - marks[f"epoch_{e - 1}_end"] for e in range(1, 1 + count)]


def bench_projector(args: argparse.Namespace, manifest: Path, work: Path) -> dict[str, Any]:
    """Epoch 1 (caching included) against the median of the later epochs of one run."""
    method = {"name": "projector", "cache_dir": str(work / "cache_projector")}
    values = recipe(method, "projector", work / "runs", manifest, args.images, args.model, args.batch_size,
                    args.workers, epochs=1 + args.repeats)
    run_recipe(values)
    marks = dict(EPOCH_TIMES)
    epoch_1 = marks["epoch_0_end"] - marks["prepare_start"]
    later = later_epochs(args.repeats)
    return {"method": "projector", "first_s": epoch_1, "second_s": statistics.median(later), "second_all_s": later,
            "ratio": epoch_1 / statistics.median(later)}


def closed_form_summary(run_dir: Path) -> dict[str, Any]:
    """The fit summary the loop logs (``fitted in closed form: {...}``)."""
    line = next(line for line in (run_dir / "logs" / "train.log").read_text().splitlines()
                if "fitted in closed form: " in line)
    return ast.literal_eval(line.split("fitted in closed form: ", 1)[1])


def bench_closed_form(name: str, args: argparse.Namespace, manifest: Path, work: Path) -> dict[str, Any]:
    """A run with an empty cache against the median of ``repeats`` runs with the warm cache."""
    method = {"name": name, "cache_dir": str(work / f"cache_{name}")}
    runs = [run_recipe(recipe(method, f"{name}_{i}", work / "runs", manifest, args.images, args.model,
                              args.batch_size, args.workers, epochs=1)) for i in range(1 + args.repeats)]
    summaries = [closed_form_summary(run.run_dir) for run in runs]
    warm = [run.train_seconds for run in runs[1:]]
    return {"method": name, "first_s": runs[0].train_seconds, "second_s": statistics.median(warm), "second_all_s": warm,
            "ratio": runs[0].train_seconds / statistics.median(warm),
            "features_s": [summary["features_seconds"] for summary in summaries],
            "fit_s": [summary["fit_seconds"] for summary in summaries]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=318, help="images of the PlantVillage apple test split")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random init)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers")
    parser.add_argument("--methods", default="projector,linear_probe,tip_adapter")
    parser.add_argument("--repeats", type=int, default=3, help="warm passes measured (their median is reported)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--work-dir", default="", help="runs and caches (default: a temporary folder, removed)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apple = shared_data_dir() / "agriculture" / "plantvillage_apple"
    manifest = apple / "test.csv"
    if not manifest.is_file():
        print(f"SKIPPED: the PlantVillage shared data is absent ({manifest} not found); set DOMAINCLIP_SHARED_DATA "
              f"to the shared data folder", file=sys.stderr)
        return 0
    install_epoch_timer()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="domainclip_cache_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    load = LoadLog()
    try:
        # one unmeasured small run first, so no measured run pays for first-time imports (scikit-learn,
        # Accelerate's lazy modules) or allocator warm-up
        run_recipe(recipe({"name": "linear_probe", "cache_dir": str(work / "cache_warmup")}, "warmup", work / "runs",
                          manifest, 2 * args.batch_size, args.model, args.batch_size, args.workers, epochs=1))
        for name in args.methods.split(","):
            with load.around(name, 0):
                result = bench_projector(args, manifest, work) if name == "projector" else bench_closed_form(
                    name, args, manifest, work)
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.images} PlantVillage images, {args.model}, batch {args.batch_size}, {args.workers} workers, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"{'method':<14}{'first (s)':>11}{'second (s)':>12}{'ratio':>8}   first = empty cache; second = median of "
          f"{args.repeats} warm passes")
    for result in results:
        what = ("epoch 1 (caching) vs epochs 2.., one run" if result["method"] == "projector" else
                f"whole fit; features {result['features_s'][0]:.2f} s -> {statistics.median(result['features_s'][1:]):.2f} s, "
                f"rest {result['fit_s'][0]:.2f} s -> {statistics.median(result['fit_s'][1:]):.2f} s")
        print(f"{result['method']:<14}{result['first_s']:>11.2f}{result['second_s']:>12.2f}{result['ratio']:>7.0f}x   {what}")
    return finish({"results": results, "images": args.images, "model": args.model, "machine": platform.platform(),
                   "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "command": " ".join(["python", *sys.argv])}, load, args.json)


if __name__ == "__main__":
    sys.exit(main())

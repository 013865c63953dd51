"""Token merging: images/s against r, and zero-shot accuracy against r, side by side with no merging.

Two parts:

* ``--part speed``: random-init open_clip ViT-B-16 and ViT-B-32 image towers (no download; a random
  tower costs what a pretrained one costs), one batch of random 224 px images, ``encode_image``
  under ``torch.inference_mode`` for each r in ``--r-b16`` / ``--r-b32`` (0 = no merging, in the
  same run). Rounds alternate the contender order; images/s is the median over rounds and the
  ratio is against r = 0 of the same tower. The load average is recorded around every contender;
  above the limit of ``measure.py`` nothing is written (exit status 3).
* ``--part accuracy``: the compact base (its vision tower is a timm ViT) on PlantVillage apple
  (shared data, else the bundled sample): zero-shot acc1 through the kit's evaluation for each
  algorithm and r, with the same images for every setting; images/s of that run is printed but is
  not a speed claim. ``--rsicd`` adds RSICD test retrieval (mean recall) when the shared data has it.
  ``--run RUN`` evaluates a finished run's model on its own eval tasks instead of the compact base
  (e.g. the compact base fine-tuned by ``agriculture/full``: the "at most one point" question needs
  a model that has accuracy to lose).

    python bench/token_merging.py --part speed --rounds 5 --batch-size 32 --json tome_speed.json
    python bench/token_merging.py --part accuracy --r 0 2 4 8 --json tome_accuracy.json
    python bench/token_merging.py --part accuracy --run runs/agriculture_full --r 0 2 4 8 --json tome_tuned.json
    python bench/token_merging.py --part speed --rounds 1 --batch-size 2 --r-b16 0 8 --r-b32 0 2   # smoke
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from measure import LoadLog, alternating, finish

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["a photo of {}.", "a close-up photo of {}.", "a field photo of {}."]


def shared_data_dir() -> Path:
    env = os.environ.get("DOMAINCLIP_SHARED_DATA")
    return Path(env) if env else REPO_ROOT / ".." / "shared" / "data"


def speed(args: argparse.Namespace) -> int:
    from domainclip.core.backbones import ModelConfig, create_backbone
    from domainclip.core.token_merging import TokenMergingConfig, apply_token_merging, merging_of

    torch.manual_seed(0)
    device = torch.device(args.device)
    images = torch.randn(args.batch_size, 3, 224, 224, device=device)
    towers = {name: create_backbone(ModelConfig(kind="open_clip", name=name)).to(device).eval()
              for name in ("ViT-B-16", "ViT-B-32")}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    settings = {"ViT-B-16": args.r_b16, "ViT-B-32": args.r_b32}
    contenders = [(name, r) for name in towers for r in settings[name]]
    labels = [f"{name} r={r}" for name, r in contenders]
    times: dict[str, list[float]] = {label: [] for label in labels}
    tokens: dict[str, list[int]] = {}
    load = LoadLog()
    with torch.inference_mode():
        for label, (name, r) in zip(labels, contenders):  # warm-up, and the token counts
            apply_token_merging(towers[name], TokenMergingConfig(algorithm=args.algorithm, r=r))
            towers[name].encode_image(images)
            state = merging_of(towers[name])
            tokens[label] = state.tokens if state is not None else []
        for round_index in range(args.rounds):
            for label in alternating(labels, round_index):
                name, r = contenders[labels.index(label)]
                apply_token_merging(towers[name], TokenMergingConfig(algorithm=args.algorithm, r=r))
                with load.around(label, round_index):
                    sync()
                    started = time.perf_counter()
                    towers[name].encode_image(images)
                    sync()
                    times[label].append(time.perf_counter() - started)
    rows = []
    for label, (name, r) in zip(labels, contenders):
        per_s = args.batch_size / statistics.median(times[label])
        base = args.batch_size / statistics.median(times[f"{name} r={settings[name][0]}"])
        rows.append({"tower": name, "r": r, "images_per_s": round(per_s, 2), "ratio_vs_first": round(per_s / base, 3),
                     "tokens_per_block": tokens[label]})
    result = {"part": "speed", "device": str(device), "algorithm": args.algorithm, "batch_size": args.batch_size, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "command": " ".join(sys.argv), "rows": rows}
    return finish(result, load, args.json)


def plantvillage_task(root: Path) -> dict[str, Any]:
    shared = root / "agriculture" / "plantvillage_apple"
    if shared.is_dir():
        return {"format": "plantvillage", "path": str(shared), "split": "test"}
    return {"format": "plantvillage", "path": str(REPO_ROOT / "recipes" / "sample_data" / "plantvillage_apple"),
            "split": "test"}


def accuracy(args: argparse.Namespace) -> int:
    from domainclip.core import config as config_lib
    from domainclip.core.backbones import create_backbone
    from domainclip.core.eval.headline import headline
    from domainclip.core.run_config import RunConfig
    from domainclip.core.token_merging.config import TokenMergingConfig
    from domainclip.core.train.evaluation import run_eval_tasks
    from domainclip.core.train.run_loading import load_trained

    if args.run:  # the run's own evaluation tasks and prompts, on its trained model
        model, _, base_cfg = load_trained(args.run)
    else:
        root = shared_data_dir()
        tasks = [{"name": "plantvillage_apple_test", "task": "zeroshot", "templates": TEMPLATES,
                  "data": plantvillage_task(root), "batch_size": args.batch_size}]
        rsicd = root / "remote_sensing" / "rsicd"
        if args.rsicd and rsicd.is_dir():
            tasks.append({"name": "rsicd_test", "task": "retrieval", "batch_size": args.batch_size,
                          "data": {"format": "rsicd", "path": str(rsicd), "split": "test"}})
        base_cfg = config_lib.from_dict(RunConfig, {"model": {"kind": "compact_base"}, "eval": tasks})
        model = create_backbone(base_cfg.model)
    model.eval()
    base_cfg = dataclasses.replace(base_cfg, data=dataclasses.replace(base_cfg.data, num_workers=args.workers))
    rows = []
    for algorithm in args.algorithms:
        for r in args.r:
            if r == 0 and algorithm != args.algorithms[0]:
                continue  # r = 0 is the same unmerged model for every algorithm
            merging = config_lib.from_dict(TokenMergingConfig, {"algorithm": algorithm, "r": r})
            cfg = dataclasses.replace(base_cfg, token_merging=merging)
            started = time.perf_counter()
            records = run_eval_tasks(cfg, model)
            seconds = time.perf_counter() - started
            row = {"algorithm": algorithm if r else "none", "r": r, "eval_seconds": round(seconds, 2)}
            for record in records:
                key, value = headline(record)
                row[f"{record['dataset']}_{key}"] = round(value, 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"part": "accuracy", "command": " ".join(sys.argv), "model": args.run or "compact_base", "rows": rows,
              "note": "eval_seconds includes decoding; it is not a speed claim (see --part speed)"}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["speed", "accuracy"], required=True)
    parser.add_argument("--algorithm", default="tome", help="speed part: tome or pitome")
    parser.add_argument("--algorithms", nargs="+", default=["tome", "pitome"], help="accuracy part")
    parser.add_argument("--r-b16", nargs="+", type=int, default=[0, 4, 8, 13, 16])
    parser.add_argument("--r-b32", nargs="+", type=int, default=[0, 2, 4])
    parser.add_argument("--r", nargs="+", type=int, default=[0, 2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="speed part: cpu or cuda")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rsicd", action="store_true", help="accuracy part: also RSICD retrieval (shared data)")
    parser.add_argument("--run", default="", help="accuracy part: a finished run's model and its eval tasks")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    return speed(args) if args.part == "speed" else accuracy(args)


if __name__ == "__main__":
    sys.exit(main())

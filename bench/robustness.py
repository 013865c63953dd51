"""Adversarial robustness on PlantVillage apple: clean and PGD accuracy before and after FARE and
TeCoA, against plain LoRA, over seeds; and the cost per training step against plain LoRA.

Every trained contender is the compact base with LoRA on the image tower (``recipes/agriculture/
fare.yaml`` with ``method.name`` = ``fare`` / ``tecoa``, and ``recipes/agriculture/lora.yaml``),
trained for ``--max-steps`` steps at ``--batch-size``, then scored by the ``robustness`` eval task
(eps ``--eps`` in 1/255, ``--pgd-steps`` PGD steps, no corruptions) on the test split; ``base`` is
the untrained compact base. The cost per step is the ratio of the training runs' samples/s
(``train_summary.json``) to plain LoRA's of the same seed: on a busy machine that ratio is
indicative only (no load-average guard: it is not recorded as a speed figure).

    python bench/robustness.py --seeds 0 1 2 --max-steps 200 --json robustness.json     # the full run (GPU)
    python bench/robustness.py --seeds 0 --max-steps 2 --batch-size 8 --pgd-steps 2 --train-pgd-steps 2 \
        --sample                                                                           # smoke, CPU

``--sample`` uses the bundled 80-leaf sample (``recipes/sample_data/plantvillage_apple``) instead
of the shared data set. RobustVLM's published numbers are for ImageNet-scale CLIP models and are
not reproduced here (docs/methods.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = ("base", "lora", "fare", "tecoa")


def data_path(sample: bool) -> str:
    if sample:
        return str(REPO_ROOT / "recipes" / "sample_data" / "plantvillage_apple")
    env = os.environ.get("DOMAINCLIP_SHARED_DATA")
    root = Path(env) if env else REPO_ROOT / ".." / "shared" / "data"
    return str(root / "agriculture" / "plantvillage_apple")


def overrides(args: argparse.Namespace, method: str, seed: int, out: Path) -> list[str]:
    path = data_path(args.sample)
    robust = {"target": "zeroshot", "eps": args.eps, "steps": args.pgd_steps, "corruptions": "", "seed": seed}
    common = [f"name={method}_s{seed}", f"output_dir={out}", f"train.seed={seed}", f"train.max_steps={args.max_steps}",
              f"data.batch_size={args.batch_size}", "data.num_workers=0", f"data.train.path={path}",
              "train.progress=false", "train.tensorboard=false", 'train.precision="no"',
              "data.augment={}", "data.crop_scale=[0.9,1.0]"]
    if method == "lora":
        return common + ["eval=" + json.dumps([{"name": "robust", "task": "robustness", "templates": ["a photo of {}."],
                                                "data": {"format": "plantvillage", "path": path, "split": "test"},
                                                "robustness": robust}])]
    return common + [f"method.name={method}", f"method.steps={args.train_pgd_steps}",
                     "eval=" + json.dumps([{"name": "robust", "task": "robustness", "templates": ["a photo of {}."],
                                            "data": {"format": "plantvillage", "path": path, "split": "test"},
                                            "robustness": robust}])]


def run_one(args: argparse.Namespace, method: str, seed: int, out: Path) -> dict[str, Any]:
    from domainclip.core.recipe_files import resolve_recipe
    from domainclip.core.train import load_run_config, train
    from domainclip.core.train.evaluation import run_eval_tasks
    from domainclip.core.backbones import create_backbone

    recipe = resolve_recipe("agriculture/lora" if method in ("lora", "base") else "agriculture/fare")
    cfg = load_run_config(recipe, overrides(args, "lora" if method == "base" else method, seed, out))
    if method == "base":
        (record,) = run_eval_tasks(cfg, create_backbone(cfg.model))
        return {"method": method, "seed": seed, **_robust(record)}
    result = train(cfg)
    summary = json.loads((result.run_dir / "train_summary.json").read_text())
    return {"method": method, "seed": seed, "samples_per_second": summary["samples_per_second"],
            **_robust(result.metrics[0])}


def _robust(record: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in record["metrics"].items() if key.startswith("acc1_")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eps", nargs="+", type=float, default=[1.0, 4.0])
    parser.add_argument("--pgd-steps", type=int, default=10, help="evaluation PGD steps")
    parser.add_argument("--train-pgd-steps", type=int, default=10, help="FARE / TeCoA PGD steps per training batch")
    parser.add_argument("--sample", action="store_true", help="the bundled 80-leaf sample instead of the shared data")
    parser.add_argument("--out", default="", help="run folders (default: a temporary folder)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="robustness_bench_"))
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            rows.append(run_one(args, method, seed, out))
            print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for method in args.methods:
        mine = [row for row in rows if row["method"] == method]
        summary[method] = {key: round(statistics.mean(row[key] for row in mine), 4) for key in mine[0]
                           if key.startswith("acc1_")}
        lora = {row["seed"]: row.get("samples_per_second") for row in rows if row["method"] == "lora"}
        costs = [lora[row["seed"]] / row["samples_per_second"] for row in mine
                 if "samples_per_second" in row and lora.get(row["seed"])]
        if costs:
            summary[method]["step_cost_vs_lora"] = round(statistics.mean(costs), 2)
    result = {"command": " ".join(sys.argv), "rows": rows, "mean_over_seeds": summary}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

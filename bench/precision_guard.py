"""Accuracy guard of the encode path: bf16 (and fp16) weights against fp32 on real data.

The compact base (``model: {kind: compact_base}``) evaluates, through the kit's one encode path
(``core/encode.py``), each data set present in the shared data with every precision asked for:

* PlantVillage apple test (zero-shot, the recipe ``agriculture/lora``'s eval task);
* RSICD test retrieval (``remote_sensing/lora``'s ``rsicd_test_retrieval``, first ``--limit``
  images) and RSICD scene zero-shot;
* paediatric chest X-ray test (``medical/cxr_pneumonia_lora``'s zero-shot task).

The comparison is the kit's own (``core/eval/precision_guard.py``, also ``domainclip
precision-guard RECIPE|RUN`` for any model): for zero-shot tasks the top-1 agreement with fp32 (per
image) and every metric's change in points; for retrieval, the agreement of each caption's top-1
image and each image's top-1 caption, and the recall changes; for both, the largest fp32 margin
among the changed decisions. The guard passes when every agreement is >= 99.5 % and every compared
metric is within 0.5 points of fp32. Accuracy only, no timing: the load average is recorded but
does not void the result.

    python bench/precision_guard.py                         # fp32 vs bf16, all data present
    python bench/precision_guard.py --limit 64 --precisions bf16,fp16 --json guard.json
    python bench/precision_guard.py --refine-ties             # zero-shot near ties re-decided in fp32

The data paths are the recipes' own (``../shared/data`` beside the repository); a data set absent
there is listed as skipped. Exit status 1 when the guard fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = (("agriculture/lora", "plantvillage_apple_test"), ("remote_sensing/lora", "rsicd_test_retrieval"),
         ("remote_sensing/lora", "rsicd_test_scenes"), ("medical/cxr_pneumonia_lora", "chest_xray_pneumonia_test"))


def eval_tasks(limit: int) -> list[Any]:
    """The eval task config of each guard task; ``limit`` caps the records."""
    from domainclip.core import config as config_lib
    from domainclip.core.recipe_files import resolve_recipe
    from domainclip.core.run_config import RunConfig

    found = []
    for recipe, name in TASKS:
        cfg = config_lib.load(RunConfig, resolve_recipe(recipe), [])
        task = next(t for t in cfg.eval if t.name == name)
        task.data.limit = limit
        found.append(task)
    return found


def present_zeroshot_tasks(limit: int) -> list[Any]:
    """The zero-shot guard tasks whose shared data is present (empty when none is)."""
    return [task for task in eval_tasks(limit) if task.task == "zeroshot" and Path(task.data.path).exists()]


NO_ZEROSHOT_DATA = "SKIPPED: no shared zero-shot data set is present"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", default="bf16", help="comma-separated, each compared with fp32")
    parser.add_argument("--limit", type=int, default=0, help="records per data set (0 = the whole test split)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--refine-ties", action="store_true",
                        help="re-encode near-tied zero-shot images in fp32 (core/eval/tie_refine.py)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    from domainclip.core.backbones import ModelConfig, create_backbone
    from domainclip.core.eval.precision_guard import format_guard, run_precision_guard

    model = create_backbone(ModelConfig(kind="compact_base")).to(args.device).eval()
    load_before = os.getloadavg()[0]
    present, absent = [], {}
    for task in eval_tasks(args.limit):
        if Path(task.data.path).exists():
            present.append(task)
        else:
            absent[task.name] = f"{task.data.path} is absent"
            print(f"{task.name}: SKIPPED ({task.data.path} is absent)", flush=True)
    if not present:
        print("SKIPPED: no shared data set is present")
        return 0
    report = run_precision_guard(present, model, args.precisions.split(","), num_workers=args.workers,
                                 refine_ties=args.refine_ties)
    report["skipped"].update(absent)
    summary = {"model": "compact_base", "device": args.device, "limit": args.limit, **report,
               "load_average_1min": [load_before, os.getloadavg()[0]], "command": " ".join(["python", *sys.argv])}
    text = json.dumps(summary, indent=2, default=float)
    print(text)
    print(format_guard(report))
    if args.json:
        Path(args.json).write_text(text)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Tie refinement: bf16 speed with fp32's decisions? ``ZeroShotClassifier`` in fp32, bf16 and bf16
with ``refine_ties`` on the shared zero-shot test sets, side by side.

The compact base classifies each data set's test images (files decoded from disk) with the
labels and prompt templates of the recipe's eval task (PlantVillage apple, RSICD scenes,
paediatric chest X-ray: the sets of ``bench/precision_guard.py``). The three contenders are the
same class with the same batch size, decode workers and torch threads; only ``precision`` and
``refine_ties`` differ. Rounds alternate the order; each contender's label classifier and tie
calibration are rebuilt before every round (outside the timing, so the refined contender pays its
calibration batch in every round). Reported per data set: images/s (median over rounds), the
ratios to fp32 and to bf16, top-1 agreement with fp32, and how many images refinement re-encoded.
The 1-minute load average is recorded around every contender; above half the core count nothing
is written (exit status 3).

    python bench/tie_refine.py --rounds 3 --json tie_refine.json

Without the shared data the script prints SKIPPED and exits with status 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from measure import LoadLog, alternating, finish
from precision_guard import NO_ZEROSHOT_DATA, present_zeroshot_tasks

CONTENDERS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16_refine_ties": ("bf16", True)}


def run(args: argparse.Namespace, tasks: list[Any]) -> tuple[dict[str, Any], LoadLog]:
    """Time the contenders on each zero-shot eval task in ``tasks`` (whose data is present)."""
    from domainclip.core.backbones import ModelConfig, create_backbone
    from domainclip.core.data.sources import load_records
    from domainclip.core.zeroshot import ZeroShotClassifier

    load = LoadLog()
    classifiers = {name: ZeroShotClassifier(create_backbone(ModelConfig(kind="compact_base")), device=args.device,
                                            batch_size=args.batch_size, workers=args.workers, precision=precision,
                                            refine_ties=refine)
                   for name, (precision, refine) in CONTENDERS.items()}
    results: dict[str, Any] = {}
    for task in tasks:
        records = load_records(task.data)
        paths = [record.image for record in records.records]
        labels, templates = list(records.class_names), list(task.templates or task.data.templates)
        seconds: dict[str, list[float]] = {name: [] for name in classifiers}
        top1: dict[str, torch.Tensor] = {}
        refined: list[int] = []
        for round_index in range(args.rounds):
            for name in alternating(list(classifiers), round_index):
                classifier = classifiers[name]
                classifier.clear_cache()
                classifier.head(labels, templates)  # the label classifier is not what is compared
                with load.around(f"{task.name}/{name}", round_index):
                    started = time.perf_counter()
                    probabilities = classifier.predict_proba(paths, labels, templates)
                    seconds[name].append(time.perf_counter() - started)
                top1[name] = probabilities.argmax(-1)
                if name == "bf16_refine_ties":
                    refined.append(classifier.last_timing.refined)
                print(f"{task.name} round {round_index + 1} {name}: {len(paths) / seconds[name][-1]:.1f} images/s",
                      flush=True)
        rates = {name: len(paths) / statistics.median(values) for name, values in seconds.items()}
        results[task.name] = {
            "images": len(paths), "classes": len(labels), "seconds": seconds, "images_per_second": rates,
            "ratio_to_fp32": {name: rate / rates["fp32"] for name, rate in rates.items()},
            "refine_ties_vs_bf16": rates["bf16_refine_ties"] / rates["bf16"],
            "top1_agreement_with_fp32": {name: float((top1[name] == top1["fp32"]).float().mean())
                                         for name in ("bf16", "bf16_refine_ties")},
            "refined_per_round": refined,
        }
    summary = {"model": "compact_base", "device": args.device, "batch_size_all": args.batch_size,
               "workers_all": args.workers, "torch_threads": torch.get_num_threads(), "rounds": args.rounds,
               "limit": args.limit, "results": results, "command": " ".join(["python", *sys.argv])}
    return summary, load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0, help="images per data set (0 = the whole test split)")
    parser.add_argument("--batch-size", type=int, default=32, help="every contender")
    parser.add_argument("--workers", type=int, default=2, help="decode threads, every contender")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="", help="write the results here (only on a quiet machine)")
    args = parser.parse_args()
    present = present_zeroshot_tasks(args.limit)
    if not present:
        print(NO_ZEROSHOT_DATA)
        return 0
    result, load = run(args, present)
    return finish(result, load, args.json)


if __name__ == "__main__":
    sys.exit(main())

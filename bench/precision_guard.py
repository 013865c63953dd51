"""Accuracy guard of the encode path: bf16 (and fp16) weights against fp32 on real data.

The compact base (``model: {kind: compact_base}``) evaluates, through the kit's one encode path
(``core/encode.py``), each data set present in the shared data with every precision asked for:

* PlantVillage apple test (zero-shot, the recipe ``agriculture/lora``'s eval task);
* RSICD test retrieval (``remote_sensing/lora``'s ``rsicd_test_retrieval``, first ``--limit``
  images) and RSICD scene zero-shot;
* paediatric chest X-ray test (``medical/cxr_pneumonia_lora``'s zero-shot task).

For zero-shot tasks it reports top-1 agreement with fp32 (per image) and every metric's change in
points; for retrieval, the agreement of each caption's top-1 image and each image's top-1 caption,
and the recall changes. The guard passes when every agreement is >= 99.5 % and every compared
metric is within 0.5 points of fp32. Accuracy only, no timing: the load average is recorded but
does not void the result.

    python bench/precision_guard.py                         # fp32 vs bf16, all data present
    python bench/precision_guard.py --limit 64 --precisions bf16,fp16 --json guard.json

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

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = (("agriculture/lora", "plantvillage_apple_test"), ("remote_sensing/lora", "rsicd_test_retrieval"),
         ("remote_sensing/lora", "rsicd_test_scenes"), ("medical/cxr_pneumonia_lora", "chest_xray_pneumonia_test"))
MIN_AGREEMENT = 0.995
MAX_POINTS = 0.5
COMPARED = ("acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@1", "image_retrieval_recall@5",
            "image_retrieval_recall@10", "text_retrieval_recall@1", "text_retrieval_recall@5",
            "text_retrieval_recall@10")


def eval_tasks(limit: int) -> list[tuple[str, Any]]:
    """(recipe, task) of each guard task whose data is present; ``limit`` caps the records."""
    from domainclip.core import config as config_lib
    from domainclip.core.recipe_files import resolve_recipe
    from domainclip.core.run_config import RunConfig

    found = []
    for recipe, name in TASKS:
        cfg = config_lib.load(RunConfig, resolve_recipe(recipe), [])
        task = next(t for t in cfg.eval if t.name == name)
        task.data.limit = limit
        found.append((recipe, task))
    return found


def scores(task: Any, model: torch.nn.Module, precision: str, workers: int) -> dict[str, Any]:
    """Per-item decisions and metrics of ``task`` with the weights held in ``precision``."""
    from domainclip.core.encode import FrozenEncoder
    from domainclip.core.eval import (build_zeroshot_classifier, captions_from_records, classification_metrics,
                                      encode_loader_images, encode_texts, retrieval_metrics)
    from domainclip.core.train.evaluation import eval_loader

    records, loader = eval_loader(task, model, workers)
    encoder = FrozenEncoder(model, precision)
    encoded = encode_loader_images(encoder, loader, need_labels=task.task == "zeroshot")
    rows = encoded.indices if encoded.indices is not None else torch.arange(encoded.features.shape[0])
    if task.task == "zeroshot":
        weights = build_zeroshot_classifier(model, records.class_names, task.templates or task.data.templates).cpu()
        logits = encoded.features @ weights
        labelled = encoded.labels >= 0
        return {"top1": logits.argmax(-1), "metrics": classification_metrics(
            logits[labelled], encoded.labels[labelled], records.class_names)}
    captions, owners = captions_from_records([records.records[int(i)] for i in rows])
    texts = encode_texts(encoder, captions).cpu()
    similarity = texts @ encoded.features.T
    return {"top1": torch.cat([similarity.argmax(-1), similarity.T.argmax(-1)]),
            "metrics": retrieval_metrics(encoded.features, texts, owners)}


def compare(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    agreement = float((reference["top1"] == other["top1"]).float().mean())
    points = {key: 100 * (other["metrics"][key] - reference["metrics"][key])
              for key in COMPARED if key in reference["metrics"]}
    passed = agreement >= MIN_AGREEMENT and all(abs(v) <= MAX_POINTS for v in points.values())
    return {"top1_agreement": agreement, "points_vs_fp32": points, "items": int(reference["top1"].numel()),
            "passed": passed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", default="bf16", help="comma-separated, each compared with fp32")
    parser.add_argument("--limit", type=int, default=0, help="records per data set (0 = the whole test split)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    from domainclip.core.backbones import ModelConfig, create_backbone

    model = create_backbone(ModelConfig(kind="compact_base")).to(args.device).eval()
    load_before = os.getloadavg()[0]
    results: dict[str, Any] = {}
    for recipe, task in eval_tasks(args.limit):
        if not Path(task.data.path).exists():
            results[task.name] = {"skipped": f"{task.data.path} is absent"}
            print(f"{task.name}: SKIPPED ({task.data.path} is absent)", flush=True)
            continue
        reference = scores(task, model, "fp32", args.workers)
        results[task.name] = {"recipe": recipe, "task": task.task, "fp32": reference["metrics"]}
        for precision in args.precisions.split(","):
            results[task.name][precision] = compare(reference, scores(task, model, precision, args.workers))
            print(f"{task.name} {precision}: {json.dumps(results[task.name][precision])}", flush=True)
    compared = [r[p] for r in results.values() if "skipped" not in r for p in args.precisions.split(",")]
    summary = {"model": "compact_base", "device": args.device, "limit": args.limit, "thresholds":
               {"min_top1_agreement": MIN_AGREEMENT, "max_points": MAX_POINTS}, "results": results,
               "passed": all(c["passed"] for c in compared), "load_average_1min": [load_before, os.getloadavg()[0]],
               "command": " ".join(["python", *sys.argv])}
    text = json.dumps(summary, indent=2, default=float)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

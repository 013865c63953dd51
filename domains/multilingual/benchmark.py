"""Multilingual retrieval benchmark: the compact base before and after cross-lingual training.

    nice -n 10 python -m domainclip.domains.multilingual.benchmark --out runs/multilingual_bench

Evaluates the offline compact base on the Flickr8k + Multi30k hash hold-out (``parallel.py``:
the images the compact base never trained on) per language, then trains each recipe of
``recipes/multilingual/`` (teacher, one_to_k, contrastive) with the one training loop and
evaluates the result the same way. Prints a Markdown table and writes ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from domainclip.core import config as config_lib
from domainclip.core.backbones import create_backbone
from domainclip.core.backbones.factory import ModelConfig
from domainclip.core.run_config import RunConfig
from domainclip.core.train import train
from domainclip.core.train import load_trained

from .parallel import load_parallel
from .retrieval import evaluate_languages

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "multilingual"
DATA = RECIPES.parents[1].parent / "shared" / "data" / "multilingual" / "flickr8k_multi30k"


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: per model, R@1 / R@5 / R@10 text->image and image->text per language, mean, MRV."""
    languages = list(next(iter(results.values()))["languages"])
    lines = ["| model | steps | " + " | ".join(f"{lang} T2I R@1/5/10" for lang in languages)
             + " | mean T2I R@1 | mean I2T R@1 | mean recall | MRV I2T | MRV T2I |",
             "|---" * (len(languages) + 7) + "|"]
    for name, result in results.items():
        cells = []
        for lang in languages:
            m = result["languages"][lang]
            cells.append("/".join(f"{100 * m[f'image_retrieval_recall@{k}']:.1f}" for k in (1, 5, 10)))
        mean = result["mean"]
        lines.append(f"| {name} | {result.get('steps', 0)} | " + " | ".join(cells)
                     + f" | {100 * mean['image_retrieval_recall@1']:.1f} | {100 * mean['text_retrieval_recall@1']:.1f}"
                     + f" | {100 * mean['mean_recall']:.1f} | {result['mrv_image_to_text']:.1f}"
                     + f" | {result['mrv_text_to_image']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/multilingual_bench")
    parser.add_argument("--data", default=str(DATA), help="folder of captions.jsonl")
    parser.add_argument("--recipes", default="teacher,one_to_k,contrastive")
    parser.add_argument("--override", action="append", default=[], help="extra recipe override (a.b=c)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = load_parallel(args.data)
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    results["compact_base"] = evaluate_languages(create_backbone(ModelConfig(kind="compact_base")), data)
    for recipe in [r for r in args.recipes.split(",") if r]:
        overrides = [f"output_dir={out}", "train.progress=false", "train.tensorboard=false", "train.precision='no'",
                     "data.num_workers=0", *args.override]
        run = train(config_lib.load(RunConfig, RECIPES / f"{recipe}.yaml", overrides))
        model, _, _ = load_trained(run.run_dir)
        results[recipe] = {**evaluate_languages(model, data), "steps": run.global_step,
                           "train_seconds": run.train_seconds}
        print(f"{recipe}: {run.global_step} steps in {run.train_seconds:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{len(data.images)} held-out images, languages {data.languages}; {time.perf_counter() - started:.0f} s")
    print(table(results))


if __name__ == "__main__":
    main()

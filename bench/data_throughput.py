"""Training data cost: the kit's dataset and loader against open_clip_train's, without a model.

Both read the same CSV of RSICD train images and captions (``train_throughput.py``'s) with the
same model's training preprocessing and tokeniser (``--model``, open_clip), so the numbers say
whether the kit's data path is what keeps a fast accelerator waiting:

* ``per_sample``: items fetched one by one in this process and collated into one batch (the
  kit's ``ImageTextDataset`` + ``Collator``; open_clip_train's ``CsvDataset`` + default collation),
  ms per sample;
* ``loader``: batches/s through each trainer's loader with ``--workers`` worker processes and
  ``--batch-size`` (the kit's through ``Accelerator.prepare``, as its loop uses it; open_clip's
  ``DataLoader`` as ``get_csv_dataset`` builds it), samples/s after the first batch.

Same batch size, workers and torch threads for both; alternating rounds; the load guard of
``measure.py``.

    python bench/data_throughput.py --rounds 3 --json data_throughput.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from measure import LoadLog, alternating, finish
from train_throughput import BenchSettings, CSV_CAPTION_KEY, CSV_IMAGE_KEY, domainclip_command, shared_data_dir, \
    write_rsicd_csv


def contenders(args: argparse.Namespace, work: Path) -> dict[str, dict[str, Callable[[], float]]]:
    """For each trainer, a per-sample timer (seconds per sample) and a loader timer (samples/s)."""
    import open_clip
    from accelerate import Accelerator
    from open_clip_train.data import CsvDataset
    from torch.utils.data import DataLoader, default_collate

    from domainclip.core.backbones import create_backbone
    from domainclip.core.data.sources import load_records
    from domainclip.core.train.loop import build_train_loader, load_run_config

    manifest = write_rsicd_csv(shared_data_dir() / "remote_sensing" / "rsicd", work / "rsicd.csv", args.rows)
    _, preprocess_train, _ = open_clip.create_model_and_transforms(args.model)
    theirs = CsvDataset(str(manifest.path), preprocess_train, img_key=CSV_IMAGE_KEY, caption_key=CSV_CAPTION_KEY,
                        sep=",", tokenizer=open_clip.get_tokenizer(args.model))
    their_loader = DataLoader(theirs, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                              pin_memory=torch.cuda.is_available(), drop_last=True)
    settings = BenchSettings(model=args.model, batch_size=args.batch_size, workers=args.workers)
    command, _ = domainclip_command(settings, manifest, work, "data", [])
    cfg = load_run_config(next(c for c in command if c.endswith(".yaml")))
    ours, _ = build_train_loader(cfg, create_backbone(cfg.model), load_records(cfg.data.train))
    our_loader = Accelerator(cpu=not torch.cuda.is_available()).prepare(ours)

    def per_sample(dataset: Any, collate: Callable) -> float:
        started = time.perf_counter()
        collate([dataset[i % len(dataset)] for i in range(args.batch_size)])
        return (time.perf_counter() - started) / args.batch_size

    def loader_rate(loader: Any) -> float:
        samples, started = 0, None
        for index, _ in enumerate(loader):
            if index == 0:
                started = time.perf_counter()  # the workers' start-up is not data cost
            else:
                samples += args.batch_size
            if index == args.batches:
                break
        return samples / (time.perf_counter() - started)

    return {"open_clip_train": {"per_sample": lambda: per_sample(theirs, default_collate),
                                "loader": lambda: loader_rate(their_loader)},
            "domainclip": {"per_sample": lambda: per_sample(ours.dataset, ours.collate_fn),
                           "loader": lambda: loader_rate(our_loader)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8, help="loader batches timed per round (after the first)")
    parser.add_argument("--rows", type=int, default=512, help="RSICD train images in the CSV")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if not (shared_data_dir() / "remote_sensing" / "rsicd" / "dataset_rsicd.json").is_file():
        print("SKIPPED: the RSICD shared data is absent")
        return 0
    load = LoadLog()
    with tempfile.TemporaryDirectory() as tmp:
        timers = contenders(args, Path(tmp))
        for parts in timers.values():  # unmeasured warm-up: imports, first-call costs
            parts["per_sample"]()
        measured: dict[str, dict[str, list[float]]] = {name: {"per_sample": [], "loader": []} for name in timers}
        for round_index in range(args.rounds):
            for name in alternating(list(timers), round_index):
                with load.around(name, round_index):
                    for part, timer in timers[name].items():
                        measured[name][part].append(timer())
                print(f"round {round_index} {name}: {1000 * measured[name]['per_sample'][-1]:.2f} ms/sample, "
                      f"loader {measured[name]['loader'][-1]:.1f} samples/s", flush=True)
    medians = {name: {"ms_per_sample": 1000 * statistics.median(parts["per_sample"]),
                      "loader_samples_per_s": statistics.median(parts["loader"])} for name, parts in measured.items()}
    result = {"settings": {**vars(args), "torch_threads": torch.get_num_threads()}, "measured": measured,
              "medians": medians,
              "per_sample_ratio_domainclip_vs_open_clip": medians["domainclip"]["ms_per_sample"]
              / medians["open_clip_train"]["ms_per_sample"],
              "loader_ratio_domainclip_vs_open_clip": medians["domainclip"]["loader_samples_per_s"]
              / medians["open_clip_train"]["loader_samples_per_s"],
              "command": " ".join(["python", *sys.argv])}
    return finish(result, load, args.json)


if __name__ == "__main__":
    sys.exit(main())

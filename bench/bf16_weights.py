"""Training settings that must not change the result: loss curves and final metrics on RSICD.

For ``remote_sensing/full`` and ``remote_sensing/lora`` (the compact base), trains ``--steps``
steps with ``train.precision: bf16`` twice, same seed and batches, with the two settings of
``--compare``:

* ``bf16_weights`` (default): bf16 autocast (fp32 weights) against ``train.bf16_weights: true``
  (bf16 matrices, fp32 masters; core/train/master_weights.py);
* ``cpu_kernels``: on the CPU, torch's default kernels (``train.cpu_kernels: false``) against
  the kit's CPU training kernels (core/train/cpu_kernels.py).

Logs the loss of every step, overlays the curves in ``--plot`` and prints the final loss, the
headline metric of RSICD test retrieval (mean recall) and the largest per-step loss difference.
Speed is measured side by side by ``bench/train_throughput.py``; the samples/s printed here come
from runs one after the other and are indicative only.

    python bench/bf16_weights.py --steps 200 --batch 32 --plot docs/img/bf16_weights_rsicd.png
    python bench/bf16_weights.py --compare cpu_kernels --steps 200 --batch 32 --workers 2 --plot docs/img/cpu_kernels_rsicd.png
    python bench/bf16_weights.py --steps 4 --batch 8 --train-limit 64 --eval-limit 32   # smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _runs import load_average, print_table, run, shared_data_present, sized_recipe

METHODS = ("full", "lora")
# per comparison: (reference setting, compared setting), each a name and its recipe overrides
COMPARISONS = {
    "bf16_weights": {"autocast": ["train.bf16_weights=false"], "bf16_weights": ["train.bf16_weights=true"]},
    "cpu_kernels": {"default_kernels": ["train.cpu_kernels=false", "train.cpu=true"],
                    "cpu_kernels": ["train.cpu_kernels=true", "train.cpu=true"]},
}


def losses(run_dir: str) -> list[float]:
    lines = (Path(run_dir) / "logs" / "train_metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines]


def plot(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """One panel per method, the two settings' curves overlaid (reference solid, compared dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (method, by_mode) in zip(axes[0], curves.items()):
        for mode, style in zip(by_mode, ("-", "--")):
            ax.plot(range(1, len(by_mode[mode]) + 1), by_mode[mode], style, label=mode, linewidth=1.2)
        ax.set_title(f"remote_sensing/{method}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="bf16_weights")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=0)
    parser.add_argument("--eval-limit", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers (8 on a GPU machine)")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if not shared_data_present():
        print("SKIPPED: the shared data (remote_sensing/rsicd) is absent")
        return 0
    modes = COMPARISONS[args.compare]
    reference_mode = next(iter(modes))
    out = Path(tempfile.mkdtemp(prefix=f"domainclip_{args.compare}_"))
    results: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[float]]] = {}
    print(f"load average before: {load_average()}", flush=True)
    for method in METHODS:
        for mode, overrides in modes.items():
            cfg = sized_recipe(f"remote_sensing/{method}", out, f"{method}_{mode}", args.seed, args.steps,
                               args.train_limit, args.eval_limit, args.batch, cpu=False,
                               extra=["train.precision=bf16", *overrides, "train.log_every=1",
                                      "train.warmup_steps=20"], workers=args.workers)
            outcome = run(cfg)
            curve = losses(outcome["run_dir"])
            summary = json.loads((Path(outcome["run_dir"]) / "train_summary.json").read_text())
            curves.setdefault(method, {})[mode] = curve
            results.append({"method": method, "mode": mode, "final_loss": curve[-1], "mean_recall": outcome["main"],
                            "samples_per_s": summary["samples_per_second"], "losses": curve})
            print(f"{method} {mode}: final loss {curve[-1]:.4f}, mean recall {outcome['main']:.4f}, "
                  f"{summary['samples_per_second']:.2f} samples/s, load {load_average()}", flush=True)
    rows = []
    for row in results:
        reference = curves[row["method"]][reference_mode]
        row["max_abs_loss_difference"] = max(abs(a - b) for a, b in zip(row["losses"], reference))
        rows.append([row["method"], row["mode"], f"{row['final_loss']:.4f}", f"{row['mean_recall']:.4f}",
                     f"{row['max_abs_loss_difference']:.2e}", f"{row['samples_per_s']:.2f}"])
    print_table(["method", "setting", "final loss", "RSICD mean recall", f"max abs loss diff vs {reference_mode}",
                 "samples/s (indicative)"], rows)
    if args.plot:
        plot(curves, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "compare": args.compare, "steps": args.steps,
                                               "batch": args.batch, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Figures of a run: the loss curve and each evaluation task before and after training."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

from .eval.report import headline_metric

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN/summary.png``: training loss per step and the eval metrics before/after."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "summary.png"
    log = run_dir / "logs" / "train_metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    metrics = json.loads((run_dir / "metrics.json").read_text())
    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    if rows:
        loss_ax.plot([r["step"] for r in rows], [r["train/loss"] for r in rows], color="tab:blue")
    else:
        loss_ax.text(0.5, 0.5, "fitted in closed form", ha="center", va="center")
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
    names, before, after = [], [], []
    for record in metrics:
        retention = record.get("retention")
        key = headline_metric(record)
        names.append(f"{record['dataset']}\n{key}")
        after.append(record["metrics"][key])
        before.append(retention["before"] if retention else float("nan"))
    positions = range(len(names))
    eval_ax.bar([p - 0.2 for p in positions], before, width=0.4, label="base", color="tab:gray")
    eval_ax.bar([p + 0.2 for p in positions], after, width=0.4, label="adapted", color="tab:green")
    eval_ax.set_xticks(list(positions), names, fontsize=8)
    eval_ax.set(title="evaluation", ylim=(0, 1))
    eval_ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

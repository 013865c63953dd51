"""Figures of a run: the loss curve and each evaluation task before and after training."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .eval.headline import headline  # noqa: E402


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN/summary.png``: training loss per step and the eval metrics before/after."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "summary.png"
    log = run_dir / "logs" / "train_metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else []
    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    if rows:
        loss_ax.plot([r["step"] for r in rows], [r["train/loss"] for r in rows], color="tab:blue")
    else:
        loss_ax.text(0.5, 0.5, "fitted in closed form", ha="center", va="center")
    loss_ax.set(title="training loss", xlabel="step", ylabel="loss")
    names, before, after = [], [], []
    for record in metrics:
        retention = record.get("retention")
        key, value = headline(record)
        names.append(f"{record['dataset']}\n{key}")
        after.append(value)
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


def plot_wise_ft(summary: dict, out: str | Path) -> Path:
    """``wise_ft.png``: the selection metric per alpha and, on a second axis, each retention task's
    share of the base's score, with the retention floor and the chosen alpha marked."""
    out = Path(out)
    rows = summary["results"]
    alphas = [row["alpha"] for row in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(alphas, [row["selection_value"] for row in rows], marker="o", color="tab:blue",
            label=f"{summary['select_on']} ({summary['metric']})")
    ax.set(xlabel="alpha (0 = base, 1 = fine-tuned)", ylabel=f"{summary['select_on']} {summary['metric']}",
           title=f"WiSE-FT: chosen alpha {summary['chosen_alpha']}")
    ax.axvline(summary["chosen_alpha"], color="tab:green", linestyle=":", label="chosen alpha")
    handles, labels = ax.get_legend_handles_labels()
    tasks = summary.get("retention_tasks") or []
    if tasks and all("retention" in row for row in rows):
        right = ax.twinx()
        for task in tasks:
            right.plot(alphas, [row["retention"][task] for row in rows], marker="s", linestyle="--",
                       label=f"{task}: share of base score")
        if summary.get("min_retention") is not None:
            right.axhline(summary["min_retention"], color="tab:red", linewidth=1,
                          label=f"retention floor {summary['min_retention']:.0%}")
        right.set_ylabel("retention (score / base score)")
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

"""``domainclip compare``: every method on the same data from the same base, side by side.

A comparison spec names one base recipe (model, full training data, evaluation tasks) and the
methods to run as recipe overrides. Few-shot protocol: every method trains on k-shot draws
(``shots``) for several seeds (``seeds``); the table reports the mean and standard deviation of
the headline metric, trained parameters, training time and the retention change. Base-to-novel
protocol: methods train on the first half of the classes and are evaluated on the base and the
novel half, reporting both and their harmonic mean (the CoOp / MaPLe protocol). The zero-shot
base is always included as the reference row.
"""
from __future__ import annotations

import copy
import json
import statistics
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import config as config_lib
from .backbones import create_backbone
from .checkpoint import atomic_write_text
from .data import load_records
from .eval.headline import headline
from .progress import progress
from .recipe_files import resolve_recipe
from .run_config import RunConfig
from .train import train
from .train.evaluation import run_eval_tasks

PROTOCOLS = ("few_shot", "base_to_novel")


CLASSIFICATION_METRICS = ("acc1", "balanced_accuracy")


@dataclass
class CompareConfig:
    """A method comparison.

    Attributes:
        name: comparison name; results go to ``output_dir/name``.
        recipe: the base recipe (path relative to this spec, or a bundled recipe name); its
            ``data.train`` is the full training set the k-shot draws come from, its first ``eval``
            task is the headline metric.
        methods: method label -> recipe overrides (a nested mapping merged into the recipe,
            e.g. ``{method: {name: lora, rank: 4}, train: {max_steps: 40}}``).
        protocol: ``few_shot`` or ``base_to_novel``.
        shots: k values of the few-shot protocol (and the shots of base-to-novel training).
        seeds: k-shot draw and training seeds; results are mean and std over them.
        output_dir: parent folder of the comparison folder.
        max_batch_size: the training batch is min(this, number of training images).
        metric: the classification metric tabulated: ``acc1`` or ``balanced_accuracy`` (use it
            for imbalanced test sets, where always answering the majority class scores high
            top-1). Retrieval tasks report ``mean_recall``.
        also: more metrics of the headline (first) task, each tabulated as a column of its own
            (e.g. ``[auroc]``: two-class tasks report the AUROC of the second class); few_shot only.
    """

    name: str = "compare"
    recipe: str = ""
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    protocol: str = "few_shot"
    shots: list[int] = field(default_factory=lambda: [1, 4, 16])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    output_dir: str = "runs"
    max_batch_size: int = 32
    metric: str = "acc1"
    also: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.also and self.protocol != "few_shot":
            raise ValueError(f"also={self.also} applies to the few_shot protocol only")
        if self.metric not in CLASSIFICATION_METRICS:
            raise ValueError(f"metric must be one of {CLASSIFICATION_METRICS}, got {self.metric!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not self.methods:
            raise ValueError("methods is empty: name at least one method to compare")
        if any(k < 1 for k in self.shots) or not self.seeds:
            raise ValueError(f"shots must be >= 1 and seeds non-empty, got {self.shots} and {self.seeds}")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "method":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _recipe_dict(spec: CompareConfig, spec_dir: Path) -> dict[str, Any]:

    candidate = spec_dir / spec.recipe
    path = candidate if candidate.is_file() else resolve_recipe(spec.recipe)
    return config_lib.expand_recipe_dir(config_lib.read_yaml(path), path.resolve().parent)


def _scores(records: list[dict[str, Any]], spec: CompareConfig) -> dict[str, float]:
    """Headline metric per task, then the ``also`` metrics of the first task.

    A task is keyed by its name; ``NAME METRIC`` where its headline is another metric than
    ``spec.metric`` (a retrieval task's ``mean_recall``), so the column says what it holds, and
    ``NAME#2`` for a second task of the same name, so neither hides the other."""
    scores: dict[str, float] = {}
    for r in records:
        metric, value = headline(r, spec.metric)
        name = r["dataset"]
        number = 2
        while any(key.split(" ", 1)[0] == name for key in scores):
            name, number = f"{r['dataset']}#{number}", number + 1
        scores[name if metric == spec.metric else f"{name} {metric}"] = value
    for metric in spec.also:
        first = records[0]
        if metric not in first["metrics"]:
            raise KeyError(f"also: task {first['dataset']!r} reports no {metric!r} "
                           f"(it has {sorted(k for k, v in first['metrics'].items() if isinstance(v, float))})")
        scores[f"{first['dataset']} {metric}"] = float(first["metrics"][metric])
    return scores


def run_configs(spec: CompareConfig, recipe: dict[str, Any], out: Path) -> list[tuple[str, int, int, dict[str, Any]]]:
    """(method, k, seed, recipe mapping) of every run the comparison needs."""
    runs = []
    for label, overrides in spec.methods.items():
        for k in spec.shots:
            for seed in spec.seeds:
                data = deep_merge(recipe, overrides)
                data["name"] = f"{label}_k{k}_s{seed}"
                data["output_dir"] = str(out / "runs")
                data.setdefault("train", {})["seed"] = seed
                data["train"].setdefault("progress", False)
                # a run folder left by an interrupted comparison is retrained, not resumed, so every
                # row's training time covers its whole training
                data["train"]["resume"] = "never"
                source = data["data"]["train"]
                source.update({"shots": k, "shot_seed": seed})
                if spec.protocol == "base_to_novel":
                    source["class_subset"] = "base"
                runs.append((label, k, seed, data))
    return runs


def eval_tasks_for(spec: CompareConfig, recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation tasks: the recipe's, or its first task split into base and novel classes."""
    tasks = recipe.get("eval") or []
    if not tasks:
        raise ValueError("the comparison's recipe has no eval task")
    if spec.protocol == "few_shot":
        return tasks
    first = tasks[0]
    split = []
    for subset in ("base", "novel"):
        task = copy.deepcopy(first)
        task["name"] = f"{first.get('name') or 'eval'}_{subset}"
        task["data"]["class_subset"] = subset
        split.append(task)
    return split


def summarise(rows: list[dict[str, Any]], spec: CompareConfig) -> list[dict[str, Any]]:
    """Mean and std over seeds per (method, k)."""
    table = []
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["shots"]), []).append(row)
    for (method, k), group in groups.items():
        entry: dict[str, Any] = {"method": method, "shots": k, "runs": len(group),
                                 "trainable_parameters": group[0]["trainable_parameters"],
                                 "train_seconds": statistics.mean(r["train_seconds"] for r in group)}
        for key in group[0]["scores"]:
            values = [r["scores"][key] for r in group]
            entry[key] = statistics.mean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        retention = [r["retention_change"] for r in group if r["retention_change"] is not None]
        entry["retention_change"] = statistics.mean(retention) if retention else None
        table.append(entry)
    return table


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def compare(spec: CompareConfig, spec_dir: Path = Path(".")) -> Path:
    """Run every (method, k, seed) and write ``compare.json``, ``compare.md`` and ``compare.png``."""
    out = Path(spec.output_dir) / spec.name
    out.mkdir(parents=True, exist_ok=True)
    recipe = _recipe_dict(spec, spec_dir)
    recipe["eval"] = eval_tasks_for(spec, recipe)
    base_cfg = config_lib.from_dict(RunConfig, recipe)
    baseline = run_eval_tasks(base_cfg, create_backbone(base_cfg.model))
    rows = _finished_rows(out / "runs.json", spec, recipe)
    done = {(r["method"], r["shots"], r["seed"]) for r in rows}
    planned = run_configs(spec, recipe, out)
    for label, k, seed, data in progress(planned, total=len(planned), desc=f"compare {spec.name}", unit="run"):
        if (label, k, seed) in done:
            continue  # finished by an earlier, interrupted invocation of the same spec
        cfg = config_lib.from_dict(RunConfig, data)
        n_train = len(load_records(cfg.data.train))
        cfg.data.batch_size = min(spec.max_batch_size, n_train)
        result = train(cfg)
        scores = _scores(result.metrics, spec)
        if spec.protocol == "base_to_novel":
            base, novel = scores[recipe["eval"][0]["name"]], scores[recipe["eval"][1]["name"]]
            scores = {"base": base, "novel": novel, "hm": harmonic_mean(base, novel)}
        retention = [retention_change(r, spec.metric) for r in result.metrics if "retention" in r]
        rows.append({"method": label, "shots": k, "seed": seed, "scores": scores,
                     "trainable_parameters": result.trainable_parameters, "train_seconds": result.train_seconds,
                     "retention_change": retention[0] if retention else None})
        atomic_write_text(out / "runs.json", json.dumps({"spec": config_lib.to_dict(spec), "recipe": recipe,
                                                         "runs": rows}, indent=2, default=str))
    zero = _scores(baseline, spec)
    if spec.protocol == "base_to_novel":
        b, n = zero[recipe["eval"][0]["name"]], zero[recipe["eval"][1]["name"]]
        zero = {"base": b, "novel": n, "hm": harmonic_mean(b, n)}
    table = summarise(rows, spec)
    result = {"spec": config_lib.to_dict(spec), "zero_shot": zero, "table": table, "runs": rows}
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2))
    atomic_write_text(out / "compare.md", render_markdown(spec, zero, table))
    plot_compare(spec, zero, table, out / "compare.png")
    return out


def _finished_rows(path: Path, spec: CompareConfig, recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of an earlier invocation that still hold: same spec apart from ``methods``, the same
    base recipe (an edited recipe file trains other runs), and the row's method configured exactly
    as now (adding a method to a spec runs only the new one)."""
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(config_lib.to_dict(spec)))
    if not isinstance(saved, dict) or not isinstance(saved.get("spec"), dict):
        return []
    if "recipe" in saved and saved["recipe"] != json.loads(json.dumps(recipe, default=str)):
        return []
    defaults = {f.name: config_lib.field_default(f) for f in fields(CompareConfig)}
    before = {**json.loads(json.dumps(defaults)), **saved["spec"]}  # fields added since then: defaults
    old_methods, new_methods = before.pop("methods", {}), current.pop("methods")
    if before != current:
        return []
    return [row for row in saved.get("runs", [])
            if row["method"] in new_methods and old_methods.get(row["method"]) == new_methods[row["method"]]]


def render_markdown(spec: CompareConfig, zero: dict[str, float], table: list[dict[str, Any]]) -> str:
    keys = list(zero)
    header = "| method | shots | " + " | ".join(column_label(spec, k) for k in keys) + \
        " | trained params | train s | retention Δ |"
    lines = [f"## {spec.name} ({spec.protocol}, seeds {spec.seeds}, metric {spec.metric})", "", header,
             "|" + "---|" * (len(keys) + 5)]
    lines.append("| zero-shot base | 0 | " + " | ".join(f"{zero[k]:.3f}" for k in keys) + " | 0 | 0 | |")
    for row in sorted(table, key=lambda r: (r["method"], r["shots"])):
        scores = " | ".join(f"{row[k]:.3f} ± {row[k + '_std']:.3f}" for k in keys)
        change = "" if row["retention_change"] is None else f"{row['retention_change']:+.3f}"
        lines.append(f"| {row['method']} | {row['shots']} | {scores} | {row['trainable_parameters']:,} | "
                     f"{row['train_seconds']:.1f} | {change} |")
    return "\n".join(lines) + "\n"


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def retention_change(record: dict[str, Any], metric: str) -> float:
    """The change of the comparison's own ``metric`` against the base (the record's retention is
    in the task's headline metric, acc1 for classification)."""
    retention = record["retention"]
    before = retention.get("before_metrics")
    if not before:  # a run from before the per-metric record
        return float(retention["change"])
    return headline(record, metric)[1] - headline({**record, "metrics": before}, metric)[1]


def metric_label(spec: CompareConfig, key: str) -> str:
    """What the plotted number is: the task and its metric (``plantvillage_test: acc1``)."""
    if spec.protocol == "base_to_novel":
        return f"harmonic mean of base and novel {spec.metric}" if key == "hm" else f"{key} {spec.metric}"
    metric = spec.metric if " " not in key else key.split(" ", 1)[1]
    return f"{key.split(' ', 1)[0]}: {metric}"


def column_label(spec: CompareConfig, key: str) -> str:
    """A table column's header, naming the metric it holds."""
    if spec.protocol == "base_to_novel":
        return f"{key} ({spec.metric})" if key != "hm" else f"hm ({spec.metric})"
    name, _, extra = key.partition(" ")
    return f"{name} ({extra or spec.metric})"


def plot_compare(spec: CompareConfig, zero: dict[str, float], table: list[dict[str, Any]], path: Path) -> None:
    """Write ``compare.png`` (see :func:`compare_figure`)."""
    import matplotlib.pyplot as plt

    fig = compare_figure(spec, zero, table)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_figure(spec: CompareConfig, zero: dict[str, float], table: list[dict[str, Any]]) -> Any:
    """The comparison figure: the headline metric per method, named on the y axis; several k values are a
    line per method over k (log2 axis; a marker and a small offset per method, so methods with equal
    scores stay visible), a single k is a bar per method with its standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "hm" if spec.protocol == "base_to_novel" else next(iter(zero))
    label = metric_label(spec, key)
    methods = sorted({r["method"] for r in table})
    shots = sorted({r["shots"] for r in table})
    fig, ax = plt.subplots(figsize=(6.5, 4))
    if len(shots) == 1:
        rows = {r["method"]: r for r in table}
        ax.bar(range(len(methods)), [rows[m][key] for m in methods], yerr=[rows[m][f"{key}_std"] for m in methods],
               capsize=3, color=[f"C{i}" for i in range(len(methods))])
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set(xlabel=f"method ({shots[0]} shots per class)")
    else:
        spread = 0.06 * (len(methods) - 1)
        for i, method in enumerate(methods):
            rows = sorted((r for r in table if r["method"] == method), key=lambda r: r["shots"])
            factor = 2 ** ((i * 0.12 - spread) if len(methods) > 1 else 0.0)  # offset in log2 space
            ax.errorbar([r["shots"] * factor for r in rows], [r[key] for r in rows],
                        yerr=[r[f"{key}_std"] for r in rows], marker=MARKERS[i % len(MARKERS)], capsize=3,
                        label=method, alpha=0.85)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set(xlabel="shots per class")
    ax.axhline(zero[key], color="black", linestyle="--", label="zero-shot base")
    ax.set(ylabel=label, title=f"{spec.name}: {label}", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def load_spec(path: str | Path, overrides: list[str] = ()) -> CompareConfig:
    return config_lib.load(CompareConfig, path, overrides)


__all__ = ["CompareConfig", "compare", "load_spec", "harmonic_mean", "deep_merge"]

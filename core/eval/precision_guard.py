"""Accuracy guard of the encode path: does holding the weights in bf16 / fp16 change a model's decisions?

For each zero-shot and retrieval task of a recipe, the guard encodes the same data with the weights
in fp32 and in each asked precision (through the kit's one encode path, ``core/encode.py``) and
compares, item by item, the top-1 decisions (per labelled image for zero-shot; for retrieval each caption's
top-1 image and each image's top-1 caption) and every metric. A precision passes when at least
:data:`MIN_AGREEMENT` of the decisions agree with fp32 and every compared metric moves by at most
:data:`MAX_POINTS` points.

It also reports the fp32 *margin* (top-1 score minus runner-up) of every decision that changed: a
lower precision reorders near ties first, so a large margin among the changed decisions points to
a real numerical problem, while changes confined to margins far below the median say the model had no clear
answer there in fp32 either.

``domainclip precision-guard TARGET`` runs it on a recipe's base model or a finished run
(``bench/precision_guard.py`` runs it on the compact base and the shared data).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..encode import check_precision
from ..train.evaluation import eval_loader, zeroshot_classifier
from .metrics import classification_metrics, retrieval_metrics
from .retrieval import captions_from_records, retrieval_features
from .zeroshot import zeroshot_logits

MIN_AGREEMENT = 0.995
"""Share of top-1 decisions that must agree with fp32."""
MAX_POINTS = 0.5
# a change of exactly MAX_POINTS computes as 0.5000000000000004 in float: compare with this slack
POINTS_SLACK = 1e-6
"""Largest change of any compared metric, in points (0.5 = half a percentage point)."""
COMPARED = ("acc1", "acc5", "mean_per_class_recall", "image_retrieval_recall@1", "image_retrieval_recall@5",
            "image_retrieval_recall@10", "text_retrieval_recall@1", "text_retrieval_recall@5",
            "text_retrieval_recall@10")
GUARDED_TASKS = ("zeroshot", "retrieval")

__all__ = ["COMPARED", "GUARDED_TASKS", "MAX_POINTS", "MIN_AGREEMENT", "Decisions", "compare_decisions",
           "format_guard", "run_precision_guard", "task_decisions"]


@dataclass
class Decisions:
    """Top-1 decisions of one task at one precision, their margins and the task's metrics."""

    top1: torch.Tensor
    """(N,) chosen class / image / caption of each decision."""
    margins: torch.Tensor
    """(N,) score of the choice minus the runner-up's (0 where there is no runner-up), in the units
    of the scores that decide: cosine similarity for retrieval, class logits for zero-shot (100 x
    cosine for the prompt ensemble)."""
    metrics: dict[str, Any]
    tie_refinement: dict[str, Any] | None = None
    """With tie refinement (zero-shot only): images seen and re-encoded in fp32 (``TieRefiner.stats``)."""


def _top1_and_margins(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.shape[-1] < 2:
        return scores.argmax(-1), torch.zeros(scores.shape[0])
    top = scores.topk(2, dim=-1)
    return top.indices[:, 0], top.values[:, 0] - top.values[:, 1]


def task_decisions(task: Any, model: torch.nn.Module, precision: str, num_workers: int = 0,
                   method: Any = None, refine_ties: bool = False) -> Decisions:
    """Decisions and metrics of one ``zeroshot`` or ``retrieval`` eval task, weights held in ``precision``.

    Scored from what evaluation scores (:func:`zeroshot_logits`, :func:`retrieval_features`), with
    the classifier evaluation picks (:func:`zeroshot_classifier`: the method's own where it has one).
    A zero-shot task refines near ties in fp32 when ``refine_ties`` or its own ``refine_ties`` is set.
    """
    if task.task not in GUARDED_TASKS:
        raise ValueError(f"eval task {task.name!r}: the precision guard covers tasks {GUARDED_TASKS}, "
                         f"not {task.task!r}")
    records, loader = eval_loader(task, model, num_workers)
    if task.task == "zeroshot":
        if not records.class_names:
            raise ValueError(f"eval task {task.name!r}: zeroshot needs labelled data")
        class_names = list(records.class_names)
        logits_fn, _ = zeroshot_classifier(task, model, method, class_names)
        logits, encoded, labels = zeroshot_logits(model, loader, class_names, task.templates or task.data.templates,
                                                  logits_fn=logits_fn, precision=precision,
                                                  refine_ties=refine_ties or task.refine_ties)
        top1, margins = _top1_and_margins(logits)
        return Decisions(top1, margins, classification_metrics(logits, labels[labels >= 0], class_names),
                         encoded.tie_refinement)
    captions, text_to_image = captions_from_records(records.records)
    found = retrieval_features(model, loader, captions, text_to_image, precision=precision)
    images, texts = found.image_features.cpu(), found.text_features.cpu()
    similarity = texts @ images.T
    (by_caption, caption_margins), (by_image, image_margins) = (_top1_and_margins(similarity),
                                                                _top1_and_margins(similarity.T))
    return Decisions(torch.cat([by_caption, by_image]), torch.cat([caption_margins, image_margins]),
                     retrieval_metrics(images, texts, found.caption_rows))


def compare_decisions(reference: Decisions, other: Decisions) -> dict[str, Any]:
    """Agreement of ``other`` with the fp32 ``reference``, metric changes in points, and the verdict."""
    if reference.top1.shape != other.top1.shape:
        raise ValueError(f"the two runs made {reference.top1.numel()} and {other.top1.numel()} decisions; "
                         "the guard compares the same items")
    changed = reference.top1 != other.top1
    points = {key: 100 * (other.metrics[key] - reference.metrics[key])
              for key in COMPARED if key in reference.metrics}
    agreement = float((~changed).float().mean())
    changed_margins = reference.margins[changed]
    found = {
        "items": int(reference.top1.numel()),
        "top1_agreement": agreement,
        "changed": int(changed.sum()),
        "largest_fp32_margin_changed": float(changed_margins.max()) if changed_margins.numel() else 0.0,
        "median_fp32_margin": float(reference.margins.median()) if reference.margins.numel() else 0.0,
        "points_vs_fp32": points,
        "passed": agreement >= MIN_AGREEMENT and all(abs(value) <= MAX_POINTS + POINTS_SLACK
                                                     for value in points.values()),
    }
    if other.tie_refinement is not None:
        found["tie_refinement"] = other.tie_refinement
    return found


def run_precision_guard(tasks: Sequence[Any], model: torch.nn.Module, precisions: Sequence[str],
                        num_workers: int = 0, method: Any = None, refine_ties: bool = False) -> dict[str, Any]:
    """The guard over ``tasks`` (eval task configs) for each of ``precisions`` against fp32.

    ``refine_ties`` refines the near ties of every zero-shot task in fp32 (as the task's own
    ``refine_ties`` does), so the guard measures the decisions a refined evaluation makes.

    Tasks other than zero-shot and retrieval are listed under ``skipped`` with the reason, never
    dropped silently. Results are keyed by task name (else data path); a key met twice gets the
    task type, then the task's position, added (``data/test.csv [retrieval]``), so no task hides
    another. Each result says whether its near ties were refined (``refine_ties``); the report's
    ``refine_ties`` is True when any task's were. ``passed`` is True when every compared (task,
    precision) passed.
    """
    for precision in precisions:
        check_precision(precision, "precision-guard precision")
        if precision in ("fp32", "auto"):
            raise ValueError(f"precision-guard compares lower precisions with fp32; got {precision!r} "
                             "(give bf16 and/or fp16)")
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for position, task in enumerate(tasks):
        name = task.name or task.data.path
        if name in results or name in skipped:
            name = f"{name} [{task.task}]"
        if name in results or name in skipped:
            name = f"{name} #{position}"
        if task.task not in GUARDED_TASKS:
            skipped[name] = f"task {task.task!r}: the guard covers {', '.join(GUARDED_TASKS)}"
            continue
        reference = task_decisions(task, model, "fp32", num_workers, method)
        refined = task.task == "zeroshot" and bool(refine_ties or task.refine_ties)
        entry: dict[str, Any] = {"task": task.task, "refine_ties": refined, "fp32": reference.metrics}
        if task.task == "retrieval" and task.rerank.name:
            entry["note"] = f"first-stage similarities compared (rerank {task.rerank.name!r} not applied)"
        for precision in precisions:
            entry[precision] = compare_decisions(reference, task_decisions(task, model, precision, num_workers,
                                                                           method, refine_ties))
        results[name] = entry
    compared = [entry[precision] for entry in results.values() for precision in precisions]
    if not compared:
        raise ValueError(f"precision-guard: no zeroshot or retrieval task to compare (skipped: {skipped})")
    return {"thresholds": {"min_top1_agreement": MIN_AGREEMENT, "max_points": MAX_POINTS},
            "precisions": list(precisions),
            "refine_ties": any(entry["refine_ties"] for entry in results.values()), "results": results, "skipped": skipped,
            "passed": all(c["passed"] for c in compared)}


def format_guard(report: dict[str, Any]) -> str:
    """A plain-text table of a :func:`run_precision_guard` report, one row per task and precision."""
    lines = [f"{'task':<32} {'prec':<5} {'items':>7} {'agree':>8} {'changed':>8} {'max margin':>11} "
             f"{'worst metric change':<34} verdict"]
    for name, entry in report["results"].items():
        for precision in report["precisions"]:
            row = entry[precision]
            worst = max(row["points_vs_fp32"].items(), key=lambda kv: abs(kv[1]), default=("-", 0.0))
            refined = row.get("tie_refinement")
            note = f" ({refined['refined']} of {refined['images']} re-encoded in fp32)" if refined else ""
            lines.append(f"{name[:32]:<32} {precision:<5} {row['items']:>7} {100 * row['top1_agreement']:>7.2f}% "
                         f"{row['changed']:>8} {row['largest_fp32_margin_changed']:>11.2e} "
                         f"{worst[0] + f' {worst[1]:+.2f} pt':<34} {'pass' if row['passed'] else 'FAIL'}{note}")
    for name, reason in report["skipped"].items():
        lines.append(f"{name[:32]:<32} skipped: {reason}")
    thresholds = report["thresholds"]
    lines.append(f"guard {'PASSED' if report['passed'] else 'FAILED'} (agreement >= "
                 f"{100 * thresholds['min_top1_agreement']:.1f} %, metrics within {thresholds['max_points']} pt; "
                 "'max margin': the largest fp32 top-1 margin among the changed decisions)")
    return "\n".join(lines)

"""Run a recipe's ``eval`` tasks on a model and return CLIP_benchmark-style records."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from accelerate import Accelerator
from torch.utils.data import DataLoader

from ..backbones import Backbone
from ..data.dataset import Collator, ImageTextDataset
from ..data.records import ImageTextRecord
from ..data.sources import load_records
from ..data.transforms import build_image_transform
from ..encode import model_device, resolve_precision
from ..eval import benchmark_json, captions_from_records, evaluate_retrieval, evaluate_zeroshot
from ..eval.headline import headline, numeric_metrics
from ..progress import progress
from ..methods import AdaptationMethod
from ..robustness import robust_retrieval, robust_zeroshot
from ..run_config import EvalTaskConfig, RunConfig
from ..token_merging import token_merging, token_merging_key


def eval_loader(task: EvalTaskConfig, model: Backbone, num_workers: int):
    """Records, dataset and loader of one eval task (deterministic order, every image once)."""
    records = load_records(task.data)
    dataset = ImageTextDataset(records, build_image_transform(model.preprocess, train=False), train=False)
    loader = DataLoader(dataset, batch_size=task.batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=Collator(None))
    return records, loader


def record_groups(task: EvalTaskConfig, records: list[ImageTextRecord]) -> list[str] | None:
    """The records' group ids when the task asks for group metrics (``groups.aggregate``), else None."""
    if not task.groups.aggregate:
        return None
    missing = sum(1 for record in records if not record.group)
    if missing:
        raise ValueError(
            f"eval task {task.name or task.data.path!r}: groups.aggregate={task.groups.aggregate!r} needs a group id "
            f"on every record, but data source format {task.data.format!r} at {task.data.path!r} gave {missing} of "
            f"{len(records)} records none (set data.group_key for csv, jsonl, parquet or label_csv; domain formats "
            "such as CT slices set their own)")
    return [record.group for record in records]


def zeroshot_classifier(task: EvalTaskConfig, model: Backbone, method: AdaptationMethod | None,
                        class_names: list[str]) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, bool]:
    """``(logits_fn, own)`` for a zeroshot task: the method's own classifier (``own`` True) where it
    has one that covers these classes, or any classes for a task that is no retention task; else
    ``(None, False)``: the prompt ensemble of the towers scores it."""
    own = method is not None and (method.covers_classes(class_names) or not task.retention)
    templates = list(task.templates or task.data.templates)
    return (method.logits_fn(model, class_names, templates) if own else None), own


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def run_eval_task(task: EvalTaskConfig, model: Backbone, accelerator: Accelerator | None = None,
                  num_workers: int = 0, model_name: str = "", pretrained: str = "",
                  method: AdaptationMethod | None = None) -> dict[str, Any]:
    """Evaluate one task; the result is one CLIP_benchmark record.

    A method with a classifier of its own (learned prompts, a probe, a cache) classifies with it.
    The record's ``precision`` is the one the weights were held in while encoding
    (``task.precision`` resolved on the model's device, ``core/encode.py``).
    """
    precision = resolve_precision(task.precision, model_device(model))
    records, loader = eval_loader(task, model, num_workers)
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader) if accelerator.num_processes > 1 else loader
    name = task.name or task.data.path
    notes = ""
    if task.task == "zeroshot":
        if not records.class_names:
            raise ValueError(f"eval task {name!r}: zeroshot needs labelled data (data.label_key or a labelled format)")
        templates = task.templates or task.data.templates
        class_names = list(records.class_names)
        logits_fn, own_classifier = zeroshot_classifier(task, model, method, class_names)
        metrics = evaluate_zeroshot(model, loader, records.class_names, templates, accelerator=accelerator,
                                    logits_fn=logits_fn, groups=record_groups(task, records.records),
                                    group_config=task.groups, precision=precision,
                                    refine_ties=task.refine_ties)
        kind = "zeroshot_classification"
        if method is not None and not own_classifier:
            # a probe / cache fitted on other classes cannot score this reference task; the towers
            # it left unchanged are scored with the prompt ensemble instead
            notes = "prompt ensemble: the method's classifier covers only its training classes"
    elif task.task == "robustness":
        metrics, kind = _robustness(task, name, model, records, loader, accelerator)
        # attacks run on the model as it is (gradients through its own weights), not on the encode path
        precision = DTYPE_NAMES.get(next(model.parameters()).dtype, str(next(model.parameters()).dtype))
        if method is not None and type(method).logits_fn is not AdaptationMethod.logits_fn:
            notes = "prompt ensemble: attacks and scores use the towers' prompt-ensemble head"
    else:
        captions, text_to_image = captions_from_records(records.records)
        metrics = evaluate_retrieval(model, loader, captions, text_to_image, accelerator=accelerator,
                                     precision=precision, rerank=task.rerank)
        kind = "zeroshot_retrieval"
    if records.skipped:
        metrics["n_skipped_records"] = len(records.skipped)
    record = benchmark_json(kind, metrics, dataset=name, model=model_name or model.kind, pretrained=pretrained)
    if notes:
        record["classifier"] = notes
    record["precision"] = precision
    return record


def _robustness(task: EvalTaskConfig, name: str, model: Backbone, records, loader,
                accelerator: Accelerator | None) -> tuple[dict[str, Any], str]:
    """Metrics and record kind of a ``robustness`` task (one process: attacks are not sharded)."""
    if accelerator is not None and accelerator.num_processes > 1:
        raise ValueError(f"eval task {name!r}: robustness runs in one process; evaluate the finished run with "
                         f"`domainclip eval RUN` without accelerate launch")
    model = accelerator.unwrap_model(model) if accelerator is not None else model
    cfg = task.robustness
    if cfg.target == "zeroshot":
        if not records.class_names:
            raise ValueError(f"eval task {name!r}: robustness.target zeroshot needs labelled data (data.label_key "
                             f"or a labelled format)")
        templates = list(task.templates or task.data.templates)
        return robust_zeroshot(model, loader, records.class_names, templates, cfg), "zeroshot_classification_robustness"
    captions, text_to_image = captions_from_records(records.records)
    return robust_retrieval(model, loader, captions, text_to_image, cfg), "zeroshot_retrieval_robustness"


def add_retention(results: list[dict[str, Any]], before: list[dict[str, Any]],
                  tasks: list[EvalTaskConfig]) -> None:
    """Attach ``retention: {metric, before, after, change}`` to the tasks measured before training.

    ``results`` holds every task of ``tasks`` in order, ``before`` the ``retention: true`` ones:
    they are matched by position, since task names may repeat (two tasks on one unnamed CSV)."""
    if len(results) != len(tasks):
        raise ValueError(f"add_retention: {len(results)} results for {len(tasks)} eval tasks")
    positions = [i for i, task in enumerate(tasks) if task.retention]
    for position, earlier in zip(positions, before):
        record = results[position]
        (metric, old), (_, new) = headline(earlier), headline(record)
        record["retention"] = {"metric": metric, "before": old, "after": new, "change": new - old,
                               "before_metrics": numeric_metrics(earlier["metrics"])}  # the change in any other metric (compare's)


def run_eval_tasks(cfg: RunConfig, model: Backbone, accelerator: Accelerator | None = None,
                   step: int | None = None, method: AdaptationMethod | None = None,
                   only_retention: bool = False) -> list[dict[str, Any]]:
    """Every ``cfg.eval`` task (or only those marked ``retention``); results carry their step.

    With ``cfg.token_merging`` set, images are encoded with merging (records carry the setting
    under ``token_merging``); a model that already merges (the zero-shot API's) keeps its own.
    """
    results = []
    model_name = cfg.model.name or f"{cfg.model.vision}+{cfg.model.text}"
    tasks = [task for task in cfg.eval if task.retention or not only_retention]
    bare = accelerator.unwrap_model(model) if accelerator is not None else model
    with token_merging(bare, cfg.token_merging) if cfg.token_merging.active else nullcontext():
        merged = token_merging_key(bare)
        for task in progress(tasks, total=len(tasks), desc="eval", unit="task"):
            record = run_eval_task(task, model, accelerator, num_workers=cfg.data.num_workers, model_name=model_name,
                                   pretrained=f"{cfg.name}:{cfg.method.name}", method=method)
            if step is not None:
                record["step"] = step
            if merged is not None:
                record["token_merging"] = merged
            results.append(record)
    return results

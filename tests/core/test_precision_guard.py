"""The precision guard (core/eval/precision_guard.py): decisions and margins, the verdict's numbers,
the guard over a model's eval tasks, ``domainclip precision-guard`` and what the model card says."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.cards import run_metadata, write_card
from domainclip.core.cli import main
from domainclip.core.eval.precision_guard import (COMPARED, Decisions, compare_decisions, format_guard,
                                                  run_precision_guard, task_decisions)
from domainclip.core.run_config import EvalTaskConfig, RunConfig
from domainclip.core.train import train
from domainclip.core.train.evaluation import run_eval_task

from ..conftest import tiny_recipe


def eval_tasks(manifest: Path) -> list[dict]:
    return [{"name": "squares", "task": "zeroshot", "templates": ["a {} square"],
             "data": {"format": "csv", "path": str(manifest), "label_key": "label"}},
            {"name": "squares_retrieval", "task": "retrieval",
             "data": {"format": "csv", "path": str(manifest), "caption_separator": "|"}}]


def tasks_of(manifest: Path, extra: list[dict] = ()) -> list[EvalTaskConfig]:
    recipe = {"model": {"kind": "open_clip", "name": "domainclip-tiny-vit"}, "eval": [*eval_tasks(manifest), *extra]}
    return config_lib.load(RunConfig, None, (), base=recipe).eval


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit")).eval()


# --- the comparison's numbers ---------------------------------------------------------------------
def decisions(top1: list[int], margins: list[float], acc1: float = 0.5) -> Decisions:
    return Decisions(torch.tensor(top1), torch.tensor(margins), {"acc1": acc1, "n_images": len(top1)})


def test_agreement_changed_decisions_and_their_fp32_margins() -> None:
    reference = decisions(list(range(200)), [0.01 * (i + 1) for i in range(200)])
    one_change = decisions([*range(199), 0], [0.0] * 200)
    result = compare_decisions(reference, one_change)
    assert result["items"] == 200 and result["changed"] == 1
    assert result["top1_agreement"] == pytest.approx(0.995) and result["passed"]  # exactly at the threshold
    assert result["largest_fp32_margin_changed"] == pytest.approx(2.0)  # the reference's margin of item 199
    assert result["median_fp32_margin"] == pytest.approx(1.0)

    two_changes = compare_decisions(reference, decisions([5, *range(1, 199), 0], [0.0] * 200))
    assert two_changes["changed"] == 2 and two_changes["top1_agreement"] == pytest.approx(0.99)
    assert not two_changes["passed"]
    assert two_changes["largest_fp32_margin_changed"] == pytest.approx(2.0)


def test_a_metric_moving_more_than_half_a_point_fails_even_with_full_agreement() -> None:
    reference = decisions([0, 1, 2], [0.1, 0.1, 0.1], acc1=0.500)
    assert compare_decisions(reference, decisions([0, 1, 2], [0.1] * 3, acc1=0.504))["passed"]
    moved = compare_decisions(reference, decisions([0, 1, 2], [0.1] * 3, acc1=0.506))
    assert moved["top1_agreement"] == 1.0 and moved["points_vs_fp32"]["acc1"] == pytest.approx(0.6)
    assert not moved["passed"]
    # exactly half a point passes (100 * (0.495 - 0.5) computes as -0.5000000000000004)
    at_limit = compare_decisions(reference, decisions([0, 1, 2], [0.1] * 3, acc1=0.495))
    assert abs(at_limit["points_vs_fp32"]["acc1"]) > 0.5 and at_limit["passed"]
    assert not compare_decisions(reference, decisions([0, 1, 2], [0.1] * 3, acc1=0.4949))["passed"]
    with pytest.raises(ValueError, match="made 3 and 2 decisions"):
        compare_decisions(reference, decisions([0, 1], [0.1, 0.1]))


# --- the guard over a model's eval tasks ----------------------------------------------------------
def test_guard_compares_every_decision_of_each_task(tiny_model, colour_squares: Path) -> None:
    robustness = {"name": "squares_attacked", "task": "robustness",
                  "data": {"format": "csv", "path": str(colour_squares), "label_key": "label"}}
    tasks = tasks_of(colour_squares, [robustness])
    report = run_precision_guard(tasks, tiny_model, ["bf16"])
    zeroshot, retrieval = report["results"]["squares"], report["results"]["squares_retrieval"]
    assert zeroshot["bf16"]["items"] == 24  # one decision per image
    assert retrieval["bf16"]["items"] == 48 + 24  # each caption's top-1 image, each image's top-1 caption
    assert report["skipped"] == {"squares_attacked": "task 'robustness': the guard covers zeroshot, retrieval"}

    # the numbers are those of the decisions themselves, and the fp32 metrics are evaluation's own
    fp32, bf16 = task_decisions(tasks[0], tiny_model, "fp32"), task_decisions(tasks[0], tiny_model, "bf16")
    assert zeroshot["bf16"]["top1_agreement"] == pytest.approx(float((fp32.top1 == bf16.top1).float().mean()))
    for task in tasks[:2]:
        evaluated = run_eval_task(dataclasses.replace(task, precision="fp32"), tiny_model)["metrics"]
        guarded = report["results"][task.name]["fp32"]
        compared = [key for key in COMPARED if key in evaluated]
        assert compared and [guarded[key] for key in compared] == pytest.approx([evaluated[key] for key in compared])
    assert report["passed"] == all(report["results"][t]["bf16"]["passed"] for t in report["results"])
    table = format_guard(report)
    assert "squares_retrieval" in table and "skipped: task 'robustness'" in table


def test_tasks_with_one_name_are_all_reported(tiny_model, colour_squares: Path) -> None:
    unnamed = [{key: value for key, value in task.items() if key != "name"} for task in eval_tasks(colour_squares)]
    tasks = tasks_of(colour_squares, [*unnamed, unnamed[0], {**unnamed[0], "refine_ties": True}])[2:]
    report = run_precision_guard(tasks, tiny_model, ["bf16"])
    path = str(colour_squares)
    assert list(report["results"]) == [path, f"{path} [retrieval]", f"{path} [zeroshot]", f"{path} [zeroshot] #3"]
    assert [entry["task"] for entry in report["results"].values()] == ["zeroshot", "retrieval", "zeroshot", "zeroshot"]
    # the task's own refine_ties is reported, per task and for the report (the model card reads it)
    assert [entry["refine_ties"] for entry in report["results"].values()] == [False, False, False, True]
    assert report["refine_ties"] is True
    assert run_precision_guard(tasks[:2], tiny_model, ["bf16"])["refine_ties"] is False


def test_guard_refuses_fp32_auto_unknown_precisions_and_nothing_to_compare(tiny_model, colour_squares: Path) -> None:
    tasks = tasks_of(colour_squares)
    with pytest.raises(ValueError, match="compares lower precisions with fp32; got 'fp32'"):
        run_precision_guard(tasks, tiny_model, ["fp32"])
    with pytest.raises(ValueError, match="did you mean 'bf16'"):
        run_precision_guard(tasks, tiny_model, ["bf61"])
    robustness = tasks_of(colour_squares, [{"name": "attacked", "task": "robustness", "data": {
        "format": "csv", "path": str(colour_squares), "label_key": "label"}}])[2:]
    with pytest.raises(ValueError, match="no zeroshot or retrieval task to compare"):
        run_precision_guard(robustness, tiny_model, ["bf16"])


# --- the command and the model card ---------------------------------------------------------------
def test_command_writes_the_report_and_the_card_states_it(colour_squares: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2)
    recipe["eval"] = eval_tasks(colour_squares)
    run_dir = train(config_lib.load(RunConfig, None, (), base=recipe)).run_dir
    capsys.readouterr()

    status = main(["precision-guard", str(run_dir), "--precisions", "bf16,fp16"])
    report = json.loads((run_dir / "precision_guard.json").read_text())
    assert status == (0 if report["passed"] else 1)
    assert report["precisions"] == ["bf16", "fp16"] and report["target"] == str(run_dir)
    assert set(report["results"]) == {"squares", "squares_retrieval"}
    out = capsys.readouterr().out
    assert "squares_retrieval" in out and f"written: {run_dir / 'precision_guard.json'}" in out

    meta = run_metadata(run_dir)
    for precision in ("bf16", "fp16"):
        assert meta["precision_guard"][precision]["top1_agreement"] == [
            {"dataset": name, "top1_agreement": pytest.approx(entry[precision]["top1_agreement"])}
            for name, entry in report["results"].items()]

    # a guard that failed becomes a limitation with its share of changed decisions
    report["results"]["squares_retrieval"]["bf16"].update(top1_agreement=0.9775, passed=False)
    (run_dir / "precision_guard.json").write_text(json.dumps(report))
    card = write_card(run_dir, tmp_path / "card").read_text()
    assert ("With the weights held in bf16, 2.2 % of the top-1 decisions on squares_retrieval differ from fp32"
            in card)
    assert "Precision guard (bf16 weights against fp32, `domainclip precision-guard`): failed" in card
    assert "refine near ties in fp32 (`refine_ties`" in card

    # a guard run with --refine-ties says that its decisions were refined
    (run_dir / "precision_guard.json").write_text(json.dumps({**report, "refine_ties": True}))
    card = write_card(run_dir, tmp_path / "card_refined").read_text()
    assert ("Precision guard (bf16 weights against fp32, zero-shot near ties re-decided in fp32, "
            "`domainclip precision-guard --refine-ties`): failed") in card
    assert run_metadata(run_dir)["precision_guard"]["bf16"]["refine_ties"] is True

    # a task named after a patient and study (or a path holding one) never reaches the card
    named = {**report, "results": {"p10000032-s50414267": report["results"]["squares_retrieval"]}}
    (run_dir / "precision_guard.json").write_text(json.dumps(named))
    folder = write_card(run_dir, tmp_path / "card_named").parent
    for written in folder.iterdir():
        assert "p10000032" not in written.read_text(errors="replace"), written.name
    assert "on [redacted] differ from fp32" in (folder / "README.md").read_text()

"""Tie refinement (core/eval/tie_refine.py): which images are re-encoded in fp32, what the band is,
and that refined decisions are fp32's in the classifier, in evaluation and in the precision guard."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from domainclip.core import config as config_lib
from domainclip.core.cli import main
from domainclip.core.encode import FrozenEncoder
from domainclip.core.eval import TieRefiner, encode_loader_images
from domainclip.core.eval.precision_guard import run_precision_guard
from domainclip.core.run_config import EvalTaskConfig, RunConfig
from domainclip.core.eval.zeroshot import zeroshot_logits
from domainclip.core.train.evaluation import eval_loader, run_eval_task
from domainclip.core.zeroshot import ZeroShotClassifier

from .test_precision_guard import tasks_of
from .test_zeroshot_api import LABELS, pixels, square_paths, tiny_backbone


class TableEncoder:
    """Stands in for a FrozenEncoder: image i (the batch holds indices) has the feature row i."""

    def __init__(self, features: torch.Tensor, precision: str):
        self.features, self.precision, self.device = features, precision, torch.device("cpu")
        self.source, self.calls = None, []

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.tolist())
        return self.features[images]


def near_tied_data(count: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 features, low-precision features (fp32 + noise) and class weights where a quarter of the
    images sit on a near tie of two classes."""
    generator = torch.Generator().manual_seed(seed)
    weights = F.normalize(torch.randn(4, 16, generator=generator), dim=-1)
    exact = F.normalize(weights[torch.arange(count) % 4] + 0.3 * torch.randn(count, 16, generator=generator), dim=-1)
    tied = torch.arange(count) % 4 == 3
    midpoint = F.normalize(weights[0] + weights[1], dim=-1)  # equally close to classes 0 and 1
    exact[tied] = F.normalize(midpoint + 1e-4 * torch.randn(int(tied.sum()), 16, generator=generator), dim=-1)
    noisy = F.normalize(exact + 2e-3 * torch.randn(count, 16, generator=generator), dim=-1)
    return exact, noisy, weights.T.contiguous()


def margins(logits: torch.Tensor) -> torch.Tensor:
    top = logits.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def test_near_ties_get_fp32_decisions_and_clear_decisions_keep_their_features() -> None:
    exact, noisy, weights = near_tied_data()
    logits_fn = lambda features: 100 * features @ weights  # noqa: E731
    fp32_top1, noisy_top1 = logits_fn(exact).argmax(1), logits_fn(noisy).argmax(1)
    assert (fp32_top1 != noisy_top1).any(), "the fixture must contain decisions the noise flips"

    low, reference = TableEncoder(noisy, "bf16"), TableEncoder(exact, "fp32")
    refiner = TieRefiner(low, logits_fn, safety=2.0, reference=reference)
    batches = [torch.arange(start, start + 16) for start in range(0, 64, 16)]
    parts, expected_later = [], 0
    for number, batch in enumerate(batches):
        if number:  # after calibration, exactly the images below safety x band are re-encoded
            expected_later += int((margins(logits_fn(noisy[batch])) < 2.0 * refiner.band).sum())
        parts.append(refiner.refine(batch, low.encode_image(batch)))
        if number == 0:
            first_band = refiner.band
    refined = torch.cat(parts)

    assert torch.equal(logits_fn(refined).argmax(1), fp32_top1)
    # calibration: the whole first batch is encoded both ways, and the band is its largest margin change
    assert reference.calls[0] == list(range(16))
    low_top2 = logits_fn(noisy[:16]).topk(2, dim=-1).indices
    change = logits_fn(exact[:16]).gather(1, low_top2) - logits_fn(noisy[:16]).gather(1, low_top2)
    assert first_band == pytest.approx(float((change[:, 0] - change[:, 1]).abs().max()), rel=1e-4)
    assert refiner.band >= first_band  # the band only widens
    assert refiner.refined == 16 + expected_later and refiner.images == 64
    assert expected_later < 48, "clear decisions must not be re-encoded"
    later = torch.cat(batches[1:])
    kept = torch.tensor([i for i in later.tolist() if i not in sum(reference.calls[1:], [])])
    assert torch.equal(refined[kept], noisy[kept])
    stats = refiner.stats()
    assert stats == {"images": 64, "refined": refiner.refined, "band": refiner.band, "safety": 2.0,
                     "precision": "bf16"}


def test_fp32_encoders_and_single_classes_are_left_alone() -> None:
    exact, noisy, weights = near_tied_data(16)
    fp32 = TieRefiner(TableEncoder(exact, "fp32"), lambda f: f @ weights)
    assert fp32.reference is None
    assert fp32.refine(torch.arange(16), exact) is exact and fp32.refined == 0
    reference = TableEncoder(exact, "fp32")
    one_class = TieRefiner(TableEncoder(noisy, "bf16"), lambda f: f @ weights[:, :1], reference=reference)
    assert one_class.refine(torch.arange(16), noisy) is noisy and reference.calls == []
    with pytest.raises(ValueError, match="safety must be > 0, got 0"):
        TieRefiner(TableEncoder(noisy, "bf16"), lambda f: f @ weights, safety=0)


# --- a real model: refined rows are fp32's features exactly -----------------------------------------
def test_refined_rows_equal_the_fp32_encoders_features(colour_squares: Path) -> None:
    model = tiny_backbone()
    images = pixels(model, square_paths(colour_squares, 12))
    bf16, fp32 = FrozenEncoder(model, "bf16"), FrozenEncoder(model, "fp32")
    weights = F.normalize(torch.randn(3, fp32.encode_image(images).shape[1]), dim=-1).T
    refiner = TieRefiner(bf16, lambda f: 100 * f @ weights)
    assert refiner.reference.model is model  # the fp32 reference runs the source itself: no second copy
    refined = refiner.refine(images, bf16.encode_image(images))  # first batch: every row refined
    assert torch.equal(refined, fp32.encode_image(images)) and refiner.refined == 12


def test_classifier_refines_decisions_and_counts_them(colour_squares: Path) -> None:
    paths = square_paths(colour_squares, 24)
    fp32 = ZeroShotClassifier(tiny_backbone(), device="cpu", precision="fp32", batch_size=8, workers=0)
    refined = ZeroShotClassifier(tiny_backbone(), device="cpu", precision="bf16", batch_size=8, workers=0,
                                 refine_ties=True)
    expected = fp32.predict_proba(paths, LABELS)
    probabilities = refined.predict_proba(paths, LABELS)
    assert torch.equal(probabilities.argmax(1), expected.argmax(1))
    # the calibration batch is fp32's exactly; the timing counts every re-encoded image
    assert torch.allclose(probabilities[:8], expected[:8], atol=1e-6)
    assert 8 <= refined.last_timing.refined <= 24 and refined.info()["refine_ties"] is True
    refined.predict_proba(paths, LABELS)  # calibrated now: only near ties again
    assert refined.last_timing.refined <= 16
    refined.encode_images(paths)  # features only, no decision: nothing is refined
    assert refined.last_timing.refined == 0


# --- evaluation, the guard and the command line ----------------------------------------------------
def test_eval_task_refine_ties_matches_fp32_and_reports_the_count(colour_squares: Path) -> None:
    model = tiny_backbone()
    task = tasks_of(colour_squares)[0]
    fp32 = run_eval_task(dataclasses.replace(task, precision="fp32"), model)["metrics"]
    refined = run_eval_task(dataclasses.replace(task, precision="bf16", refine_ties=True), model)["metrics"]
    assert refined["acc1"] == fp32["acc1"] and refined["mean_per_class_recall"] == fp32["mean_per_class_recall"]
    # the 24 squares fit one eval batch (64), the calibration batch: every image is refined
    assert refined["tie_refinement"]["images"] == 24 and refined["tie_refinement"]["refined"] == 24
    assert "tie_refinement" not in fp32
    records, loader = eval_loader(task, model, 0)
    logits = {name: zeroshot_logits(model, loader, records.class_names, task.templates, precision=precision,
                                    refine_ties=refine)[0]
              for name, precision, refine in (("fp32", "fp32", False), ("bf16", "bf16", False),
                                              ("refined", "bf16", True))}
    assert not torch.equal(logits["bf16"], logits["fp32"])  # bf16 alone moves the logits ...
    assert torch.equal(logits["refined"], logits["fp32"])  # ... refined rows are fp32's exactly

    with pytest.raises(ValueError, match="'squares_retrieval': refine_ties .* needs task 'zeroshot'"):
        EvalTaskConfig(name="squares_retrieval", task="retrieval", refine_ties=True)
    with pytest.raises(ValueError, match="cannot be combined with with_tokens"):
        encode_loader_images(model, [], with_tokens=True, refine=lambda images, features: features)


def test_guard_with_refine_ties_reports_refined_zero_shot_decisions(colour_squares: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    model = tiny_backbone()
    report = run_precision_guard(tasks_of(colour_squares), model, ["bf16"], refine_ties=True)
    zeroshot = report["results"]["squares"]["bf16"]
    assert report["refine_ties"] is True and zeroshot["top1_agreement"] == 1.0
    assert zeroshot["tie_refinement"]["images"] == 24 and zeroshot["tie_refinement"]["refined"] == 24
    assert zeroshot["points_vs_fp32"] == {"acc1": 0.0, "acc5": 0.0, "mean_per_class_recall": 0.0}
    assert "tie_refinement" not in report["results"]["squares_retrieval"]["bf16"]  # retrieval is never refined

    recipe = {"model": {"kind": "open_clip", "name": "domainclip-tiny-vit"},
              "eval": [{"name": "squares", "task": "zeroshot", "templates": ["a {} square"],
                        "data": {"format": "csv", "path": str(colour_squares), "label_key": "label"}}],
              "output_dir": str(tmp_path / "runs"), "name": "guard"}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(json.dumps(recipe))
    status = main(["precision-guard", str(recipe_path), "--refine-ties", "--out", str(tmp_path / "guard.json")])
    written = json.loads((tmp_path / "guard.json").read_text())
    assert status == 0 and written["results"]["squares"]["bf16"]["top1_agreement"] == 1.0
    assert "re-encoded in fp32)" in capsys.readouterr().out
    assert config_lib.load(RunConfig, None, (), base=recipe).eval[0].refine_ties is False

"""The one training loop: precision, accumulation, schedule, bad inputs, run folder, evaluation."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from domainclip.core import config as config_lib
from domainclip.core.data.bad_inputs import TooManyBadInputsError
from domainclip.core.run_config import RunConfig
from domainclip.core.train import load_trained, train
from domainclip.core.train.optim import cosine_with_warmup

from ..conftest import tiny_recipe


def run(recipe: dict, *overrides: str):
    return train(config_lib.load(RunConfig, None, overrides, base=recipe))


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()]


def test_bf16_run_learns_and_writes_the_run_folder(colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=8, precision="bf16", tensorboard=True)
    recipe["eval"] = [{"name": "squares", "task": "zeroshot", "templates": ["a {} square"],
                       "data": {"format": "csv", "path": str(colour_squares), "label_key": "label"}},
                      {"name": "squares_retrieval", "task": "retrieval",
                       "data": {"format": "csv", "path": str(colour_squares), "caption_separator": "|"}}]
    result = run(recipe)
    folder = result.run_dir
    assert result.global_step == 8
    losses = [row["train/loss"] for row in logged(folder)]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learns
    for name in ("config.yaml", "metrics.json", "bad_inputs.json", "train_summary.json", "model/trainable.safetensors",
                 "model/model.json", "logs/train.log"):
        assert (folder / name).is_file(), name
    assert list((folder / "logs").rglob("events.out.tfevents.*")), "TensorBoard events missing"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [m["task"] for m in metrics] == ["zeroshot_classification", "zeroshot_retrieval"]
    assert metrics[0]["dataset"] == "squares" and 0 <= metrics[0]["metrics"]["acc1"] <= 1
    assert metrics[1]["metrics"]["n_captions"] == 48  # both captions of each image are scored
    resolved = config_lib.load(RunConfig, folder / "config.yaml")
    assert resolved.train.precision == "bf16" and resolved.train.max_steps == 8

    model, _, _ = load_trained(folder)
    saved = json.loads((folder / "train_summary.json").read_text())
    assert saved["global_step"] == 8 and saved["trainable_parameters"] == sum(p.numel() for p in model.parameters())


def test_gradient_accumulation_counts_optimizer_steps(colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=3, grad_accum=2)
    recipe["data"]["batch_size"] = 4
    result = run(recipe)
    assert result.global_step == 3
    assert [row["step"] for row in logged(result.run_dir)] == [1, 2, 3]
    assert json.loads((result.run_dir / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())[
        "batches_in_epoch"] == 6


def test_epochs_mode_covers_the_data(colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=0, epochs=2)
    result = run(recipe)
    assert result.global_step == 2 * (24 // 8)


def test_bad_images_are_skipped_counted_and_listed(colour_squares: Path, tmp_path: Path) -> None:
    broken = colour_squares.parent / "img" / "5.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated JPEG
    (colour_squares.parent / "img" / "7.jpg").unlink()  # missing file
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=3)
    recipe["data"]["max_bad_fraction"] = 0.1
    result = run(recipe)
    report = json.loads((result.run_dir / "bad_inputs.json").read_text())
    assert sorted(Path(item["path"]).name for item in report["items"]) == ["5.jpg", "7.jpg"]
    assert all(item["reason"] for item in report["items"])

    recipe["name"] = "strict"
    recipe["data"]["max_bad_fraction"] = 0.01
    with pytest.raises(TooManyBadInputsError, match=r"data.max_bad_fraction"):
        run(recipe)


def test_data_waits_are_timed_per_log_line() -> None:
    import time

    from domainclip.core.train.loop import DataWaits

    def slow(count: int, seconds: float):
        for item in range(count):
            time.sleep(seconds)
            yield item

    waits = DataWaits()
    assert list(waits.timed(slow(3, 0.05))) == [0, 1, 2]
    first = waits.since_last_read()
    assert 0.15 <= first == waits.total < 1.0
    assert waits.since_last_read() == 0.0  # nothing waited since the last read
    for _ in waits.timed(slow(1, 0.05)):
        time.sleep(0.1)  # the loop's own work is not a wait
    second = waits.since_last_read()
    assert 0.05 <= second < 0.15 and waits.total == pytest.approx(first + second)  # 0.15+ if the 0.1 s counted


def test_logged_data_waits_add_up_to_the_logged_total(colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=4, log_every=2)
    result = run(recipe)
    waits = [row["train/data_wait_s"] for row in logged(result.run_dir)]
    assert len(waits) == 2 and all(wait >= 0 for wait in waits)
    line = next(line for line in (result.run_dir / "logs" / "train.log").read_text().splitlines()
                if "for data in" in line)
    total = float(line.split("waited ")[1].split(" s")[0])
    assert total == pytest.approx(sum(waits), abs=0.06)  # the log rounds to 0.1 s


def test_cosine_schedule_with_warmup() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = cosine_with_warmup(optimizer, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx([1.0, 2.0] + [2.0 * c for c in cosine])


def test_too_small_data_is_a_clear_error(colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs")
    recipe["data"]["batch_size"] = 64
    with pytest.raises(ValueError, match=r"has 24 items, fewer than data.batch_size=64"):
        run(recipe)


def test_training_streams_webdataset_shards(colour_squares: Path, tmp_path: Path) -> None:
    from domainclip.core.data import DataSourceConfig, load_records, write_shards

    records = load_records(DataSourceConfig(format="csv", path=str(colour_squares), caption_separator="|"))
    broken = Path(records.records[3].image)
    broken.write_bytes(broken.read_bytes()[:150])  # lands in the shard as an undecodable image
    written = write_shards(records, str(tmp_path / "shards" / "train-%04d.tar"), samples_per_shard=10)
    assert len(written.shards) == 3
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=0, epochs=2)
    recipe["data"]["train"] = {"format": "webdataset", "path": written.pattern, "num_samples": 24}
    recipe["data"]["num_workers"] = 2
    recipe["data"]["max_bad_fraction"] = 0.1
    result = run(recipe)
    assert result.global_step == 2 * 3  # ceil(24 / 8) batches per epoch
    report = json.loads((result.run_dir / "bad_inputs.json").read_text())
    assert report["bad"] == 1 and report["items"][0]["path"].endswith("train-0000.tar#000000003")
    # workers batch their own shards, so a pass can end in short batches: the step budget comes
    # from num_samples, and the first pass over all 24 samples was complete
    assert 24 < report["seen"] <= 2 * 24


def test_retention_reports_the_change_on_a_reference_task(colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=4)
    recipe["eval"] = [{"name": "reference", "task": "zeroshot", "templates": ["a {} square"], "retention": True,
                       "data": {"format": "csv", "path": str(colour_squares), "label_key": "label"}},
                      {"name": "target", "task": "retrieval",
                       "data": {"format": "csv", "path": str(colour_squares)}}]
    result = run(recipe)
    reference, target = result.metrics
    assert "retention" not in target
    retention = reference["retention"]
    assert retention["metric"] == "acc1" and retention["after"] == reference["metrics"]["acc1"]
    assert retention["change"] == pytest.approx(retention["after"] - retention["before"])
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    before = retention.pop("before_metrics")
    assert before["acc1"] == retention["before"] and "balanced_accuracy" in before  # for another metric's change
    assert saved[0]["retention"].pop("before_metrics") == pytest.approx(before)
    assert saved[0]["retention"] == pytest.approx(retention) and "retention" not in saved[1]
    # "before" is the untrained base: evaluating a freshly built base gives the same number
    from domainclip.core.backbones import create_backbone
    from domainclip.core.train.evaluation import run_eval_tasks

    cfg = config_lib.load(RunConfig, None, (), base=recipe)
    torch.manual_seed(cfg.train.seed)
    base = run_eval_tasks(cfg, create_backbone(cfg.model), only_retention=True)
    assert base[0]["metrics"]["acc1"] == pytest.approx(retention["before"])


def test_extra_training_sources_are_concatenated(colour_squares: Path, tmp_path: Path) -> None:
    from domainclip.core.train.loop import load_train_records

    recipe = tiny_recipe(colour_squares, tmp_path / "runs")
    recipe["data"]["train_extra"] = [{"format": "csv", "path": str(colour_squares), "limit": 5}]
    records = load_train_records(config_lib.load(RunConfig, None, (), base=recipe))
    assert len(records) == 29 and [r.label for r in records.records[24:]] == [-1] * 5


def test_locked_text_tower_runs_in_eval_mode_and_its_features_are_cached_exactly(colour_squares: Path,
                                                                                 tmp_path: Path) -> None:
    from domainclip.core.backbones import ModelConfig, create_backbone
    from domainclip.core.methods import build_method
    from domainclip.core.methods.full import FullConfig
    from domainclip.core.train.frozen import TextFeatureCache, frozen_towers, set_frozen_towers_eval

    model = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit"))
    build_method(FullConfig(lock_text=True)).apply(model)
    assert frozen_towers(model) == ["text"]
    model.train()
    set_frozen_towers_eval(model, ["text"])
    assert not model.model.transformer.training and model.model.visual.training
    cache = TextFeatureCache(model)
    first = cache(["a red square", "a blue square", "a red square"], torch.device("cpu"))
    assert (cache.misses, cache.hits) == (2, 1) and torch.equal(first[0], first[2])
    cache(["a blue square"], torch.device("cpu"))
    assert cache.hits == 2
    with torch.no_grad():
        direct = model.encode_text(model.tokenize(["a blue square"]))
    assert torch.allclose(first[1], direct[0], atol=1e-6)

    weights = {}
    for cached in (True, False):
        recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=4, cache_text_features=cached)
        recipe["name"] = f"cached_{cached}"
        recipe["method"] = {"name": "full", "lock_text": True}
        result = run(recipe)
        weights[cached] = load_file(str(result.run_dir / "model" / "trainable.safetensors"))
        assert "cached text features: " + str(cached) in (result.run_dir / "logs" / "train.log").read_text()
    assert weights[True].keys() == weights[False].keys()
    assert not any(k.startswith("model.transformer.") for k in weights[True])  # saves only what it trains
    for key in weights[True]:
        assert torch.allclose(weights[True][key], weights[False][key], atol=1e-6), (key, (weights[True][key] - weights[False][key]).abs().max().item())


def test_auto_precision_follows_the_device_and_bf16_on_a_slow_cpu_warns(colour_squares: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    from domainclip.core.train import loop

    for fast, expected in ((False, "no"), (True, "bf16")):
        monkeypatch.setattr(loop, "resolve_precision", lambda p, d, fast=fast: "bf16" if fast else "fp32")
        assert loop.training_precision("auto", on_cpu=True) == expected
    assert loop.training_precision("fp16", on_cpu=False) == "fp16"
    monkeypatch.setattr(loop, "resolve_precision", lambda p, d: "fp32")  # a CPU without AVX-512 BF16 / AMX
    monkeypatch.setattr(loop, "cpu_has_fast_bf16", lambda: False)
    result = run(tiny_recipe(colour_squares, tmp_path / "runs", max_steps=1, precision="auto"))
    summary = json.loads((result.run_dir / "train_summary.json").read_text())
    assert summary["precision"] == "no" and "train.precision=auto: no on this CPU" in (
        result.run_dir / "logs" / "train.log").read_text()
    capsys.readouterr()
    bf16 = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=1, precision="bf16", bf16_weights=True)
    bf16["name"] = "bf16"
    folder = run(bf16).run_dir
    assert "warning: train.precision=bf16 on a CPU without AVX-512 BF16 / AMX" in capsys.readouterr().err
    assert json.loads((folder / "train_summary.json").read_text())["precision"] == "bf16"
    auto_weights = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=1, precision="auto", bf16_weights=True)
    auto_weights["name"] = "auto_weights"
    log = (run(auto_weights).run_dir / "logs" / "train.log").read_text()
    assert "train.bf16_weights ignored: training runs in 'no' (train.precision=auto)" in log


def test_evaluations_during_training_are_kept_with_their_step(colour_squares: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=4, eval_every=2)
    recipe["eval"] = [{"name": "squares", "task": "zeroshot", "batch_size": 8,
                       "data": {"format": "csv", "path": str(colour_squares), "label_key": "label",
                                "caption_separator": "|", "templates": ["a {} square"]}}]
    run_dir = train(config_lib.load(RunConfig, None, (), base=recipe)).run_dir
    during = [json.loads(line) for line in (run_dir / "logs" / "eval_metrics.jsonl").read_text().splitlines()]
    assert [(record["step"], record["dataset"]) for record in during] == [(2, "squares")]  # step 4 is the final one
    assert 0.0 <= during[0]["metrics"]["acc1"] <= 1.0
    final = json.loads((run_dir / "metrics.json").read_text())
    assert [record["step"] for record in final] == [4]
    assert "eval at step 2: squares (zeroshot_classification)" in (run_dir / "logs" / "train.log").read_text()


def test_a_frozen_temperature_above_100_is_left_as_it_is(colour_squares: Path, tmp_path: Path) -> None:
    """The clamp to 100 is for a learned temperature; SigLIP's frozen 117.33 must reach training and eval alike."""
    from transformers import SiglipModel

    from ..tiny_models import save_tiny_hf

    folder = save_tiny_hf(tmp_path / "siglip", "siglip")
    hf = SiglipModel.from_pretrained(folder)
    with torch.no_grad():
        hf.logit_scale.fill_(math.log(117.33))  # google/siglip-base-patch16-224's value
    hf.save_pretrained(folder)
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2)
    recipe["model"], recipe["loss"] = {"kind": "hf", "name": str(folder)}, {"name": "siglip"}
    recipe["method"] = {"name": "lora", "towers": ["image"]}  # the temperature is not trained
    result = train(config_lib.load(RunConfig, None, (), base=recipe))
    logged = [json.loads(line)["train/logit_scale"] for line in (result.run_dir / "logs" / "train_metrics.jsonl").open()]
    assert logged == pytest.approx([117.33, 117.33], rel=1e-5)
    model, _, _ = load_trained(result.run_dir)
    assert model.logit_scale.exp().item() == pytest.approx(117.33, rel=1e-5)


def test_grad_accum_steps_whole_groups_and_runs_whole_epochs(colour_squares: Path, tmp_path: Path) -> None:
    """24 images in batches of 8 = 3 batches per epoch; with grad_accum 2 an epoch is one step of 2
    batches and the third is left out (a partial group stepped at half weight and cut epochs short)."""
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=0, epochs=3, grad_accum=2, save_every=0)
    result = train(config_lib.load(RunConfig, None, (), base=recipe))
    assert result.global_step == 3
    state = json.loads(sorted((result.run_dir / "checkpoints").glob("step_*/trainer_state.json"))[-1].read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (2, 2)  # the third epoch's step took its batches 1 and 2
    assert state["bad_inputs"]["seen"] == 3 * 2 * 8  # 3 steps of 2 x 8 images; the left-out batches are not counted


def test_logged_lr_is_train_lr_on_its_schedule_whatever_the_layer_decay(colour_squares: Path, tmp_path: Path) -> None:
    logged = {}
    for decay in (1.0, 0.5):
        recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=3)
        recipe.update(name=f"decay{decay}", method={"name": "full", "layer_decay": decay})
        result = train(config_lib.load(RunConfig, None, (), base=recipe))
        logged[decay] = [json.loads(line)["train/lr"] for line in (result.run_dir / "logs" / "train_metrics.jsonl").open()]
    assert logged[0.5] == pytest.approx(logged[1.0]) and logged[1.0][0] < 1e-3  # the most-decayed group's was logged

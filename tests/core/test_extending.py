"""docs/extending.md, followed step by step: a toy method, a toy domain and a toy backbone family are
added the way the page says (registration only, no edit elsewhere) and work end to end."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from domainclip.core import config as config_lib
from domainclip.core.backbones import (BACKBONES, Backbone, ModelConfig, PreprocessConfig, TokenFeatures, Tokens,
                                       create_backbone, register_backbone)
from domainclip.core.backbones.base import all_tokens_mask
from domainclip.core.data.records import ImageTextRecord, RecordSet, captions_from_templates
from domainclip.core.data.sources import FORMAT_LOADERS, DataSourceConfig, register_format
from domainclip.core.data.transforms import TRAIN_TRANSFORMS, build_image_transform, register_transform
from domainclip.core.methods import METHODS, AdaptationMethod, MethodConfig, TaskInfo, register_method
from domainclip.core.run_config import RunConfig
from domainclip.core.train import load_trained, train

from ..conftest import tiny_recipe

DOCS = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


@pytest.fixture(autouse=True)
def toy_extensions() -> Any:
    """Register the toy method, domain and family as the page says, for this module's tests only (the
    kit's registries, and so the generated recipe reference, stay as shipped for every other test)."""
    register_method("bias_only", BiasOnlyConfig)(BiasOnly)
    register_format("toy_colours")(load_toy_colours)
    register_transform("toy_jitter")(build_toy_jitter)
    register_backbone("toy")(ToyBackbone)
    yield
    for registry, name in ((METHODS, "bias_only"), (MethodConfig.REGISTRY, "bias_only"), (FORMAT_LOADERS, "toy_colours"),
                           (TRAIN_TRANSFORMS, "toy_jitter"), (BACKBONES, "toy")):
        registry.pop(name)


# --- "Add a method" ------------------------------------------------------------------------------
@dataclass
class BiasOnlyConfig(MethodConfig):
    """``method: {name: bias_only}``: train only the bias terms (BitFit)."""

    name: str = "bias_only"
    train_logit_scale: bool = False


class BiasOnly(AdaptationMethod):
    def apply(self, model: Backbone, task: TaskInfo | None = None) -> Backbone:
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith(".bias") or (self.cfg.train_logit_scale and "logit_scale" in name))
        return model


def test_a_method_is_one_registration_and_trains_resumes_and_saves_only_what_it_trains(
        colour_squares: Path, tmp_path: Path) -> None:
    assert "bias_only" in METHODS and "method: {name: bias_only}" in DOCS.read_text()
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=4)
    recipe["method"] = {"name": "bias_only"}
    result = train(config_lib.from_dict(RunConfig, recipe))
    saved = load_file(str(result.run_dir / "model" / "trainable.safetensors"))
    assert saved and all(name.endswith(".bias") for name in saved)
    model, method, cfg = load_trained(result.run_dir)
    assert isinstance(method, BiasOnly) and cfg.method.name == "bias_only"
    for name, value in saved.items():
        assert torch.equal(dict(model.named_parameters())[name].detach(), value)
    recipe["method"] = {"name": "bias_only", "train_logit_scal": True}
    with pytest.raises(config_lib.ConfigError, match="did you mean 'train_logit_scale'"):
        config_lib.from_dict(RunConfig, recipe)


# --- "Add a domain" ------------------------------------------------------------------------------
def load_toy_colours(cfg: DataSourceConfig) -> RecordSet:
    """A ``path,colour`` CSV; captions from the recipe's templates; unknown colours listed as skipped."""
    manifest = Path(cfg.path)
    names = ["red", "green", "blue"]
    records, skipped = [], []
    with open(manifest, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["colour"] not in names:
                skipped.append((row["path"], f"unknown colour {row['colour']!r}"))
                continue
            records.append(ImageTextRecord(str(manifest.parent / row["path"]),
                                           captions_from_templates(row["colour"], list(cfg.templates)),
                                           names.index(row["colour"])))
    return RecordSet(records, class_names=names, raw_class_names=names, skipped=skipped)


class ToyJitter:
    def __init__(self, preprocess: PreprocessConfig, strength: float):
        self.base, self.strength = build_image_transform(preprocess, train=False), strength

    def __call__(self, image: Any) -> torch.Tensor:
        tensor = self.base(image)
        return tensor + self.strength * torch.randn_like(tensor)


def build_toy_jitter(preprocess: PreprocessConfig, scale: tuple[float, float] = (0.9, 1.0),
                     strength: float = 0.1) -> ToyJitter:
    return ToyJitter(preprocess, strength)


def test_a_domain_registers_a_format_and_an_augmentation_and_a_recipe_uses_them(colour_squares: Path,
                                                                                tmp_path: Path) -> None:
    manifest = colour_squares.parent / "toy.csv"
    with open(colour_squares, newline="") as source, open(manifest, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "colour"])
        for row in csv.DictReader(source):
            writer.writerow([row["image"], row["label"]])
        writer.writerow(["img/0.jpg", "purple"])
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=3)
    recipe["data"]["train"] = {"format": "toy_colours", "path": str(manifest), "templates": ["a {} square."]}
    recipe["data"]["augment"] = {"name": "toy_jitter", "strength": 0.05}
    recipe["eval"] = [{"name": "val", "task": "zeroshot", "data": dict(recipe["data"]["train"])}]
    result = train(config_lib.from_dict(RunConfig, recipe))
    bad = json.loads((result.run_dir / "bad_inputs.json").read_text())
    assert "unknown colour 'purple'" in json.dumps(bad)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert any("val" in json.dumps(record) for record in metrics)
    recipe["data"]["augment"] = {"name": "toy_jiter"}
    recipe["name"] = "typo"
    with pytest.raises(ValueError, match="did you mean 'toy_jitter'"):
        train(config_lib.from_dict(RunConfig, recipe))


# --- "Add a backbone family" ---------------------------------------------------------------------
class _Tokenize:
    def __call__(self, texts: list[str]) -> Tokens:
        ids = torch.zeros(len(texts), 8, dtype=torch.long)
        mask = torch.zeros(len(texts), 8, dtype=torch.long)
        for row, text in enumerate(texts):
            codes = [ord(c) % 97 + 1 for c in text[:8]]
            ids[row, :len(codes)] = torch.tensor(codes)
            mask[row, :len(codes)] = 1
        return {"input_ids": ids, "attention_mask": mask}


class ToyBackbone(Backbone):
    """Patch tokens of an 8x8 convolution and character embeddings, each mean-pooled and projected."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patches = nn.Conv2d(3, 16, 8, 8)
        self.chars = nn.Embedding(98, 16)
        self.image_proj, self.text_proj = nn.Linear(16, 12, bias=False), nn.Linear(16, 12, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.preprocess = PreprocessConfig(image_size=32)
        self.text_tokenizer = _Tokenize()
        self.tower_prefixes = {"image": ("patches.", "image_proj."), "text": ("chars.", "text_proj.")}
        self.block_prefixes = {"image": "patches.blocks.", "text": "chars.blocks."}
        self._cfg = cfg

    @property
    def embed_dim(self) -> int:
        return 12

    def encode_image_tokens(self, images: torch.Tensor) -> TokenFeatures:
        tokens = self.image_proj(self.patches(images).flatten(2).transpose(1, 2))
        return TokenFeatures(tokens, all_tokens_mask(tokens), tokens.mean(1), "mean")

    def encode_text_tokens(self, tokens: Tokens) -> TokenFeatures:
        mask = tokens["attention_mask"].bool()
        hidden = self.text_proj(self.chars(tokens["input_ids"]))
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return TokenFeatures(hidden, mask, pooled, "mean")

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image_tokens(images).pooled

    def _text_features(self, tokens: Tokens) -> torch.Tensor:
        return self.encode_text_tokens(tokens).pooled

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "preprocess": self.preprocess.to_dict()}


def test_a_backbone_family_is_one_registration_and_the_kit_asks_its_interface(colour_squares: Path,
                                                                             tmp_path: Path) -> None:
    model = create_backbone(ModelConfig(kind="toy"))
    images, tokens = torch.randn(2, 3, 32, 32), model.tokenize(["red", "a green square"])
    out = model(images, tokens, with_tokens=True)
    assert out["image_tokens"].shape == (2, 16, 12) and out["text_token_mask"].sum(1).tolist() == [3, 8]
    torch.testing.assert_close(out["text_features"], F.normalize(model.encode_text_tokens(tokens).pooled, dim=-1))
    with pytest.raises(NotImplementedError, match="model.kind 'toy' \\(ToyBackbone\\) provides none"):
        from domainclip.core.methods import build_method
        from domainclip.core.methods.prompt_learning import CoOpConfig

        build_method(CoOpConfig()).apply(model, TaskInfo(["red"], ["a {}."]))
    from domainclip.core.export import formats_for_kind

    assert formats_for_kind("toy") == ("adapter",)
    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=3)
    recipe["model"] = {"kind": "toy"}
    result = train(config_lib.from_dict(RunConfig, recipe))
    reloaded, _, _ = load_trained(result.run_dir)
    assert isinstance(reloaded, ToyBackbone)

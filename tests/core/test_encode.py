"""The one encode path (core/encode.py): precision resolution, frozen weights cast once, float32
features close to fp32, the precision in the feature-cache key, in metrics.json and in classify,
decoding overlapped with the forward pass, and the bf16 accuracy guard on the bundled sample."""
from __future__ import annotations

import copy
import csv
import json
import pickle
import threading
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from domainclip.core import config as config_lib
from domainclip.core import encode as encode_module
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.cli import main
from domainclip.core.encode import (
    PACKED_LINEAR_ENV,
    FrozenEncoder,
    PackedLinear,
    cpu_has_fast_bf16,
    eval_mode,
    model_device,
    pack_cpu_linears,
    packed_linear_available,
    resolve_precision,
)
from domainclip.core.eval import classification_metrics, encode_texts
from domainclip.core.features import FeatureCache
from domainclip.core.run_config import RunConfig
from domainclip.core.zeroshot import ImagePreparer, ZeroShotClassifier

from ..conftest import tiny_recipe
from .test_zeroshot_api import LABELS, TEMPLATES, pixels, square_paths, tiny_backbone, write_open_clip_folder

SAMPLE = Path(__file__).resolve().parents[2] / "recipes" / "sample_data" / "plantvillage_apple"


def fake_cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 {flags}\n\n"
                    f"processor\t: 1\nflags\t\t: fpu sse2 avx2 {flags}\n")
    return path


# --- precision resolution -----------------------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [("avx512f avx512_bf16", "bf16"), ("amx_bf16 amx_tile", "bf16"),
                                             ("amx_tile", "bf16"), ("avx512f avx512_vnni", "fp32"), ("", "fp32")])
def test_auto_reads_the_cpus_bf16_flags(tmp_path: Path, flags: str, expected: str) -> None:
    cpuinfo = fake_cpuinfo(tmp_path, flags)
    assert cpu_has_fast_bf16(cpuinfo) is (expected == "bf16")
    assert resolve_precision("auto", "cpu", cpuinfo) == expected
    for explicit in ("fp32", "bf16", "fp16"):  # an explicit precision is taken as given
        assert resolve_precision(explicit, "cpu", cpuinfo) == explicit


def test_auto_without_cpuinfo_is_fp32_and_bad_names_are_errors(tmp_path: Path) -> None:
    assert resolve_precision("auto", "cpu", tmp_path / "absent") == "fp32"
    with pytest.raises(ValueError, match=r"precision must be one of .*got 'bf61'; did you mean 'bf16'\?"):
        resolve_precision("bf61", "cpu")


def test_the_environment_overrides_the_host_cpus_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(encode_module, "_host_cpu_has_fast_bf16", lambda: True)  # a CPU with AVX-512 BF16
    monkeypatch.delenv("DOMAINCLIP_CPU_BF16", raising=False)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setenv("DOMAINCLIP_CPU_BF16", "0")
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # an explicit precision is still taken as given
    assert resolve_precision("auto", "cpu", fake_cpuinfo(tmp_path, "avx512_bf16")) == "bf16"  # a given file wins
    monkeypatch.setattr(encode_module, "_host_cpu_has_fast_bf16", lambda: False)
    monkeypatch.setenv("DOMAINCLIP_CPU_BF16", "1")
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setenv("DOMAINCLIP_CPU_BF16", "yes")
    with pytest.raises(ValueError, match=r"^\$DOMAINCLIP_CPU_BF16 must be 0 or 1, got 'yes'$"):
        resolve_precision("auto", "cpu")


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp32")])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch: pytest.MonkeyPatch, capability: tuple,
                                                     expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", "cuda:0") == expected


def test_eval_task_precision_is_checked() -> None:
    with pytest.raises(config_lib.ConfigError, match="precision must be one of"):
        config_lib.load(RunConfig, None, ["eval=[{name: e, precision: half}]"])


# --- the frozen copy ----------------------------------------------------------------------------
def test_bf16_weights_are_cast_once_into_a_copy_and_the_source_is_untouched(colour_squares: Path) -> None:
    model = tiny_backbone().train()
    model.model.visual.conv1.weight.requires_grad_(True)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flags = {name: module.training for name, module in model.named_modules()}

    encoder = FrozenEncoder(model, "bf16")
    assert encoder.precision == "bf16" and encoder.copied
    copy_params = dict(encoder.model.named_parameters())
    assert {p.dtype for p in copy_params.values()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in copy_params.values())
    pointers = {name: p.data_ptr() for name, p in copy_params.items()}
    images = pixels(model, square_paths(colour_squares, 4))
    encoder.encode_image(images)
    encoder.encode_texts(["a red square", "a blue square"])
    # the same bf16 tensors serve every call (nothing re-cast per call)
    assert {name: p.data_ptr() for name, p in encoder.model.named_parameters()} == pointers

    after = model.state_dict()
    assert all(after[name].dtype == tensor.dtype and torch.equal(after[name], tensor) for name, tensor in before.items())
    assert model.model.visual.conv1.weight.requires_grad
    assert {name: module.training for name, module in model.named_modules()} == flags
    assert not any(p.data_ptr() in pointers.values() for p in model.parameters())


def test_fp32_runs_the_model_itself_and_refresh_follows_new_weights(colour_squares: Path) -> None:
    model = tiny_backbone()
    assert not FrozenEncoder(model, "fp32").copied
    encoder = FrozenEncoder(model, "bf16")
    images = pixels(model, square_paths(colour_squares, 2))
    old = encoder.encode_image(images)
    with torch.no_grad():
        model.model.visual.proj.mul_(-1.0)
    assert torch.allclose(encoder.encode_image(images), old)  # the frozen copy keeps the cast weights
    encoder.refresh()
    assert torch.allclose(encoder.encode_image(images), -old, atol=1e-6)


def test_features_are_float32_normalised_and_close_to_fp32(colour_squares: Path) -> None:
    model = tiny_backbone(seed=3)
    images = pixels(model, square_paths(colour_squares, 6))
    texts = ["a red square", "a green square", "a photo of a blue square"]
    reference = FrozenEncoder(model, "fp32")
    for precision in ("bf16", "fp16"):
        encoder = FrozenEncoder(model, precision)
        for ours, theirs in ((encoder.encode_image(images), reference.encode_image(images)),
                             (encode_texts(model, texts, precision=precision), reference.encode_texts(texts))):
            assert ours.dtype == torch.float32
            assert torch.allclose(ours.norm(dim=-1), torch.ones(len(ours)), atol=1e-5)
            assert (ours * theirs).sum(-1).min() > 0.99, precision
    with torch.no_grad():  # fp32 through the encoder is exactly the model's own output
        direct = model.encode_image(images, normalize=True)
    assert torch.allclose(reference.encode_image(images), direct, atol=1e-6)


def test_eval_mode_restores_every_flag_and_model_device() -> None:
    model = tiny_backbone().train()
    model.model.transformer.eval()  # a submodule kept in eval mode by its owner
    with eval_mode(model):
        assert not any(module.training for module in model.modules())
        assert not torch.is_grad_enabled()
    assert model.training and not model.model.transformer.training
    assert model_device(model) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")


# --- linear layers packed for oneDNN on the CPU ----------------------------------------------------
def test_a_packed_linear_gives_nn_linears_output() -> None:
    assert packed_linear_available(torch.float32)  # any x86 torch build: oneDNN is built in
    # bf16: eager runs the same oneDNN product, so the output is equal bit for bit; fp32: eager
    # runs MKL's, so they agree to rounding (the kit packs only bf16 copies)
    dtypes = [torch.float32, *([torch.bfloat16] if packed_linear_available(torch.bfloat16) else [])]
    torch.manual_seed(0)
    for dtype in dtypes:
        for bias in (True, False):
            linear = torch.nn.Linear(48, 40, bias=bias).to(dtype).requires_grad_(False)
            packed = PackedLinear(linear)
            assert packed.weight is linear.weight and packed.bias is linear.bias
            for x in (torch.randn(7, 48), torch.randn(3, 5, 48), torch.randn(48, 6).t(), torch.randn(0, 48)):
                x = x.to(dtype)
                with torch.no_grad():
                    ours, theirs = packed(x), linear(x)
                assert ours.shape == theirs.shape, (dtype, bias, tuple(x.shape))
                if dtype == torch.bfloat16:
                    assert torch.equal(ours, theirs), (bias, tuple(x.shape))
                else:
                    assert torch.allclose(ours, theirs, atol=1e-5), (bias, tuple(x.shape))
    # a copy (deepcopy, pickle) packs its own weight again: oneDNN's opaque tensor cannot be copied
    x = torch.randn(3, 48).to(packed.weight.dtype)
    for clone in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert clone.packed is not packed.packed and clone.weight is not packed.weight
        with torch.no_grad():
            assert torch.equal(clone.weight, packed.weight) and torch.equal(clone(x), packed(x))
    # a graph that needs gradients goes through F.linear (the packed product has no backward)
    linear = torch.nn.Linear(48, 40)
    packed = PackedLinear(linear)
    x = torch.randn(4, 48, requires_grad=True)
    packed(x).sum().backward()
    assert torch.allclose(x.grad, linear.weight.sum(0).expand(4, -1)) and linear.weight.grad is not None
    with pytest.raises(RuntimeError):
        packed(torch.randn(2, 48, dtype=torch.float64))  # another dtype fails as nn.Linear would


def test_a_packed_linear_follows_writes_to_its_weight() -> None:
    torch.manual_seed(1)
    dtype = torch.bfloat16 if packed_linear_available(torch.bfloat16) else torch.float32
    linear = torch.nn.Linear(16, 12).to(dtype).requires_grad_(False)
    packed = PackedLinear(linear)
    x = torch.randn(5, 16).to(dtype)
    with torch.no_grad():
        first = packed(x)
        packed.load_state_dict({"weight": torch.randn(12, 16).to(dtype), "bias": linear.bias.clone()})  # in place
        assert not torch.equal(packed(x), first)
        assert torch.allclose(packed(x), torch.nn.functional.linear(x, packed.weight, packed.bias), atol=1e-2)
        packed.weight.data = torch.zeros(12, 16, dtype=dtype)  # replaced, not written
        assert torch.equal(packed(x), packed.bias.expand(5, -1))
        packed.float()  # another dtype: packed again in it, not run on the stale packed weight
        assert torch.equal(packed(x.float()), packed.bias.expand(5, -1))


def test_the_packing_switch_takes_0_or_1(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_backbone()
    monkeypatch.setenv(PACKED_LINEAR_ENV, "1")
    assert FrozenEncoder(model, "bf16").pack_linears
    monkeypatch.setenv(PACKED_LINEAR_ENV, "false")  # would have left packing on, silently
    with pytest.raises(ValueError, match=r"^\$DOMAINCLIP_CPU_PACKED_LINEAR must be 0 or 1, got 'false'$"):
        FrozenEncoder(model, "bf16")


def test_two_names_of_the_models_device_need_no_copy() -> None:
    model = tiny_backbone()
    for name in ("cpu", "cpu:0", torch.device("cpu", 0)):
        encoder = FrozenEncoder(model, "fp32", name)
        assert not encoder.copied and encoder.device == torch.device("cpu"), name
    assert ZeroShotClassifier(model, device="cpu:0", precision="fp32").encoder.copied is False


def test_pack_cpu_linears_packs_plain_linears_once_and_leaves_attention_alone() -> None:
    shared = torch.nn.Linear(8, 8)
    attention = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    model = torch.nn.ModuleDict({"a": torch.nn.Sequential(shared, torch.nn.ReLU(), torch.nn.Linear(8, 4)),
                                 "b": torch.nn.Sequential(shared), "attention": attention}).eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        before = (model["a"](x), model["attention"](x, x, x)[0])
        assert pack_cpu_linears(model) == 2  # the shared layer once, attention's out_proj not at all
        assert model["a"][0] is model["b"][0] and isinstance(model["a"][2], PackedLinear)
        assert type(attention.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear
        assert torch.allclose(model["a"](x), before[0], atol=1e-6)
        assert torch.equal(model["attention"](x, x, x)[0], before[1])


def test_a_bf16_cpu_encoder_packs_its_copy_and_gives_the_same_features(monkeypatch: pytest.MonkeyPatch,
                                                                        colour_squares: Path) -> None:
    model = tiny_backbone(seed=5)
    images = pixels(model, square_paths(colour_squares, 5))
    texts = ["a red square", "a photo of a blue square", "green"]
    monkeypatch.setenv(PACKED_LINEAR_ENV, "0")
    plain = FrozenEncoder(model, "bf16")
    assert plain.packed_linears == 0
    monkeypatch.delenv(PACKED_LINEAR_ENV)
    encoder = FrozenEncoder(model, "bf16")
    classifier = ZeroShotClassifier(model, device="cpu", precision="bf16")
    assert classifier.info()["packed_linears"] == encoder.packed_linears
    if not packed_linear_available(torch.bfloat16):  # a CPU or build without oneDNN bf16: nothing is packed
        assert encoder.packed_linears == 0 and not any(isinstance(m, PackedLinear) for m in encoder.model.modules())
        return
    layers = [m for m in encoder.model.modules() if isinstance(m, PackedLinear)]
    assert encoder.packed_linears == len(layers) > 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())  # the source is untouched
    assert torch.equal(encoder.encode_image(images), plain.encode_image(images))
    assert torch.equal(encoder.encode_texts(texts), plain.encode_texts(texts))
    assert FrozenEncoder(model, "fp32").packed_linears == 0  # fp32 runs the source model itself
    encoder.refresh()
    assert encoder.packed_linears == len(layers)
    encoder.pack_linears = False  # per encoder, applied by refresh
    encoder.refresh()
    assert encoder.packed_linears == 0 and not any(isinstance(m, PackedLinear) for m in encoder.model.modules())
    assert FrozenEncoder(model, "bf16", pack_linears=False).packed_linears == 0


def test_a_bf16_cpu_that_cannot_pack_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode_module, "packed_linear_available", lambda dtype: False)
    model = tiny_backbone()
    monkeypatch.setattr(encode_module, "_host_cpu_has_fast_bf16", lambda: True)  # a CPU that should pack
    with pytest.warns(UserWarning, match="cannot pack bf16 linear layers.*DOMAINCLIP_CPU_PACKED_LINEAR=0"):
        encoder = FrozenEncoder(model, "bf16")
    assert encoder.packed_linears == 0
    monkeypatch.setattr(encode_module, "_host_cpu_has_fast_bf16", lambda: False)  # bf16 chosen on another CPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FrozenEncoder(model, "bf16").packed_linears == 0
        assert FrozenEncoder(model, "bf16", pack_linears=False).packed_linears == 0


# --- the feature cache key ----------------------------------------------------------------------
def test_cache_key_and_features_differ_by_precision(colour_squares: Path, tmp_path: Path) -> None:
    model = tiny_backbone()
    cache = FeatureCache(tmp_path / "cache")
    keys = {p: cache.space_key(model, "image", precision=p) for p in ("fp32", "bf16", "fp16")}
    assert len(set(keys.values())) == 3
    assert cache.space_key(model, "image", precision="auto") == keys[resolve_precision("auto", "cpu")]
    assert cache.space_key(model, "text", precision="fp32") != cache.space_key(model, "text", precision="bf16")

    paths = square_paths(colour_squares, 5)
    fp32 = cache.image_features(model, paths, precision="fp32")
    bf16 = cache.image_features(model, paths, precision="bf16")
    assert (fp32.key, bf16.key) == (keys["fp32"], keys["bf16"])
    assert bf16.computed == 5 and bf16.reused == 0  # fp32 rows are never served for bf16
    space = json.loads((tmp_path / "cache" / bf16.key / "space.json").read_text())
    assert space["precision"] == "bf16"
    assert not torch.equal(fp32.features, bf16.features)
    assert (fp32.features * bf16.features).sum(-1).min() > 0.99
    assert cache.image_features(model, paths, precision="bf16").reused == 5


# --- metrics.json and classify ------------------------------------------------------------------
def test_metrics_json_records_the_precision_of_each_eval_task(colour_squares: Path, tmp_path: Path) -> None:
    from domainclip.core.train import train

    recipe = tiny_recipe(colour_squares, tmp_path / "runs", max_steps=1)
    data = {"format": "csv", "path": str(colour_squares), "label_key": "label", "caption_separator": "|"}
    recipe["eval"] = [{"name": "squares_bf16", "task": "zeroshot", "templates": ["a {} square"], "data": data,
                       "precision": "bf16"},
                      {"name": "squares_fp32", "task": "zeroshot", "templates": ["a {} square"], "data": data,
                       "precision": "fp32"},
                      {"name": "squares_retrieval", "task": "retrieval", "data": data}]
    result = train(config_lib.load(RunConfig, None, (), base=recipe))
    records = {r["dataset"]: r for r in json.loads((result.run_dir / "metrics.json").read_text())}
    assert records["squares_bf16"]["precision"] == "bf16"
    assert records["squares_fp32"]["precision"] == "fp32"
    assert records["squares_retrieval"]["precision"] == resolve_precision("auto", "cpu")
    assert abs(records["squares_bf16"]["metrics"]["acc1"] - records["squares_fp32"]["metrics"]["acc1"]) <= 1 / 24


def test_classify_precision_flag(tmp_path: Path, colour_squares: Path, capsys: pytest.CaptureFixture) -> None:
    backbone = tiny_backbone(seed=5)
    folder = write_open_clip_folder(tmp_path / "oc", backbone)
    paths = square_paths(colour_squares, 3)
    reference = ZeroShotClassifier(backbone, templates=TEMPLATES, device="cpu", precision="fp32")
    expected = reference.predict_proba(paths, LABELS)
    args = ["classify", "--model", str(folder), "--labels", ",".join(LABELS), "--templates", TEMPLATES[0],
            "--template", TEMPLATES[1], "--precision", "bf16", *paths]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    got = torch.tensor([[{p["label"]: p["probability"] for p in item["predictions"]}[label] for label in LABELS]
                        for item in printed])
    assert torch.allclose(got, expected, atol=2e-2)
    assert ZeroShotClassifier.from_pretrained(folder, device="cpu", precision="bf16").info()["precision"] == "bf16"
    with pytest.raises(SystemExit):
        main(["classify", "--model", str(folder), "--labels", "a,b", "--precision", "half", *paths])
    assert "invalid choice: 'half'" in capsys.readouterr().err


# --- decoding overlapped with the forward pass --------------------------------------------------
def test_background_decoding_gives_the_same_batches_and_names_bad_files(colour_squares: Path,
                                                                         tmp_path: Path) -> None:
    model = tiny_backbone()
    paths = square_paths(colour_squares, 7)
    threads: set[str] = set()
    dtypes: set[torch.dtype] = set()
    preparer = ImagePreparer(model.preprocess, workers=2)
    original = preparer.prepare

    def recording(item, position, **options):
        threads.add(threading.current_thread().name)
        out = original(item, position, **options)
        dtypes.add(out.dtype)
        return out

    preparer.prepare = recording  # type: ignore[method-assign]
    inline = list(ImagePreparer(model.preprocess, workers=0).batches(paths, 3))
    background = list(preparer.batches(paths, 3))
    assert [b.shape[0] for b in background] == [3, 3, 1]
    assert all(torch.equal(a, b) for a, b in zip(inline, background))
    assert threads and all(name.startswith("domainclip-decode") for name in threads)
    # the threads stop at uint8 pixels (no torch arithmetic beside the forward pass's threads);
    # the batch normalised at once equals each image's full transform bit for bit
    assert dtypes == {torch.uint8}
    one_by_one = torch.stack([ImagePreparer(model.preprocess).prepare(path, 0) for path in paths])
    assert one_by_one.dtype == torch.float32 and torch.equal(torch.cat(background), one_by_one)
    # one batch mixing files, PIL images and preprocessed float tensors: only the pixels are normalised
    mixed = [paths[0], Image.open(paths[1]), one_by_one[2], paths[3]]
    (batch,) = ImagePreparer(model.preprocess, workers=2).batches(mixed, 4)
    assert torch.equal(batch, one_by_one[:4])

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        list(ImagePreparer(model.preprocess, workers=2).batches([*paths, str(broken)], 3))


def test_classifier_reports_where_the_time_went(colour_squares: Path) -> None:
    classifier = ZeroShotClassifier(tiny_backbone(), device="cpu", batch_size=2, workers=2)
    classifier.predict_proba(square_paths(colour_squares, 5), LABELS)
    timing = classifier.last_timing
    assert timing.images == 5 and timing.decode_s > 0 and timing.normalize_s > 0 and timing.forward_s > 0
    # the forward loop's own parts are disjoint: together they fit in the wall time
    assert timing.wall_s >= timing.forward_s + timing.wait_s + timing.normalize_s - 1e-3
    shares = timing.shares()
    work = timing.decode_s + timing.normalize_s + timing.forward_s
    assert shares["normalize_share_of_work"] == pytest.approx(timing.normalize_s / work)
    assert sum(shares[f"{part}_share_of_work"] for part in ("decode", "normalize", "forward")) == pytest.approx(1.0)
    assert shares["waiting_share_of_wall"] == pytest.approx(timing.wait_s / timing.wall_s)


# --- accuracy guard: bf16 against fp32 on the bundled sample ------------------------------------
def test_bf16_agrees_with_fp32_on_the_bundled_sample() -> None:
    with open(SAMPLE / "test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    paths = [str(SAMPLE / row["path"]) for row in rows]
    classes = sorted({row["label"] for row in rows})
    names = [label.split("___")[1].replace("_", " ") for label in classes]
    truth = torch.tensor([classes.index(row["label"]) for row in rows])
    metrics, predictions = {}, {}
    for precision in ("fp32", "bf16"):
        classifier = ZeroShotClassifier.from_pretrained("compact_base", device="cpu", precision=precision,
                                                        batch_size=40)
        assert classifier.precision == precision
        probabilities = classifier.predict_proba(paths, names, ["a photo of a {} leaf.", "a leaf with {}."])
        predictions[precision] = probabilities.argmax(-1)
        metrics[precision] = classification_metrics(probabilities.log(), truth, names)
    agreement = (predictions["fp32"] == predictions["bf16"]).float().mean().item()
    assert len(paths) == 80 and agreement >= 0.995
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert abs(metrics["fp32"][key] - metrics["bf16"][key]) <= 0.005, key

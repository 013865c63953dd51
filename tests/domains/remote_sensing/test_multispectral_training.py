"""4-band GeoTIFFs trained through the one loop (``model.input: multispectral``), reloaded and exported."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, PreprocessConfig, create_backbone
from domainclip.core.data.dataset import Collator, ImageTextDataset
from domainclip.core.data.records import ImageTextRecord
from domainclip.core.data.transforms import build_image_transform
from domainclip.core.run_config import RunConfig
from domainclip.core.train import load_trained, train
from domainclip.core.train.run_folder import RunFolder
from domainclip.core.zeroshot import ImagePreparer

rasterio = pytest.importorskip("rasterio", reason="rasterio (extra 'geo') is not installed")
from domainclip.domains.remote_sensing.multispectral import BandStats, read_geotiff  # noqa: E402

from .make_fake_data import write_geotiff  # noqa: E402

BANDS = ["B02", "B03", "B04", "B08"]
# per class: a level for each band (blue, green, red, near infrared), in reflectance-like units
LEVELS = {"forest": (300, 600, 250, 3500), "river": (900, 800, 500, 300), "industrial": (1500, 1500, 1600, 2000)}
PER_CLASS = 4
SIZE = 24


def write_scenes(root: Path) -> Path:
    """``root/<class>/<class>_<i>.tif``: 4 described uint16 bands, nodata 0 in one corner."""
    rng = np.random.default_rng(0)
    for name, levels in LEVELS.items():
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            bands = {band: (level + rng.normal(0, 60, (SIZE, SIZE))).clip(1, None).astype(np.uint16)
                     for band, level in zip(BANDS, levels)}
            bands["B08"][:2, :2] = 0
            write_geotiff(root / name / f"{name}_{i}.tif", bands, nodata=0)
    return root


def recipe(data: Path, out: Path, **model_input: object) -> dict:
    """LoRA on the tiny open_clip model, reading the 4 bands, overhead augmentation."""
    return {
        "name": "ms",
        "output_dir": str(out),
        "model": {"kind": "open_clip", "name": "domainclip-tiny-vit",
                  "input": {"name": "multispectral", "bands": BANDS, **model_input}},
        "method": {"name": "lora", "towers": ["image"], "rank": 4},
        "data": {"train": {"format": "scene_folders", "path": str(data)}, "batch_size": 4, "num_workers": 0,
                 "augment": {"name": "overhead"}},
        "train": {"max_steps": 3, "lr": 1e-3, "precision": "no", "log_every": 1, "progress": False,
                  "tensorboard": False, "warmup_steps": 0},
    }


def run_config(data: dict, overrides: list[str] = ()) -> RunConfig:
    return config_lib.load(RunConfig, None, overrides, base=data)


@pytest.fixture
def scenes(tmp_path: Path) -> Path:
    return write_scenes(tmp_path / "scenes")


def eval_batch(model, paths: list[str]) -> torch.Tensor:  # noqa: ANN001
    """The images at ``paths`` through the model's own evaluation preprocessing."""
    transform = build_image_transform(model.preprocess, train=False)
    return torch.stack([transform(transform.open_image(path)) for path in paths])


def test_train_reload_and_export_give_the_same_embeddings(scenes: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    trained = {}
    save_model = RunFolder.save_model

    def keep(self, model, *args, **kwargs):  # noqa: ANN001, ANN202 - capture the in-memory model
        trained["model"] = model
        return save_model(self, model, *args, **kwargs)

    monkeypatch.setattr(RunFolder, "save_model", keep)
    result = train(run_config(recipe(scenes, tmp_path / "runs")))
    assert result.global_step == 3

    # the band statistics were computed from the training images (nodata skipped) and recorded
    paths = sorted(str(p) for p in scenes.rglob("*.tif"))
    expected = BandStats.from_images([read_geotiff(p, BANDS) for p in paths])
    info = json.loads((result.run_dir / "model" / "model.json").read_text())
    recorded = info["model"]["input"]
    assert recorded["bands"] == BANDS and recorded["rgb"] == ["B04", "B03", "B02"]
    assert recorded["mean"] == pytest.approx(expected.mean) and recorded["std"] == pytest.approx(expected.std)
    preprocess = info["backbone"]["preprocess"]
    assert preprocess["reader"] == {"name": "geotiff", "bands": BANDS}
    assert preprocess["mean"] == pytest.approx(expected.mean)

    model = trained["model"].eval()
    reloaded, _, cfg = load_trained(result.run_dir)
    reloaded.eval()
    assert cfg.model.input["mean"] == recorded["mean"]
    assert reloaded.preprocess == model.preprocess and reloaded.preprocess.channels == 4
    images = eval_batch(reloaded, paths[:6])
    assert images.shape == (6, 4, reloaded.preprocess.image_size, reloaded.preprocess.image_size)
    with torch.no_grad():
        want = model.encode_image(images)
        assert torch.allclose(reloaded.encode_image(images), want, atol=1e-5)
        # training changed the image tower: the adapted base alone gives other embeddings
        base = create_backbone(cfg.model).eval()
        assert not torch.allclose(base.encode_image(images), want, atol=1e-3)

    from domainclip.core.export import export_run, load_adapter

    exported, _ = load_adapter(export_run(result.run_dir, "adapter", tmp_path / "adapter"))
    exported.eval()
    assert exported.preprocess == model.preprocess
    with torch.no_grad():
        assert torch.allclose(exported.encode_image(images), want, atol=1e-5)
    with pytest.raises(ValueError, match="4 channel"):
        export_run(result.run_dir, "open_clip", tmp_path / "open_clip")
    # the index and the service decode RGB images: refused up front, naming the reader
    from domainclip.core.index import Encoder

    with pytest.raises(ValueError, match=r"reads its images with the 'geotiff' reader .* RGB models only"):
        Encoder.load(str(result.run_dir), device="cpu")


def test_eval_transform_reads_bands_and_normalises(scenes: Path) -> None:
    path = sorted(scenes.rglob("*.tif"))[0]
    mean, std = (500.0, 600.0, 700.0, 800.0), (100.0, 200.0, 300.0, 400.0)
    preprocess = PreprocessConfig(image_size=SIZE, mean=mean, std=std,
                                  reader={"name": "geotiff", "bands": ["B08", "B04", "B03", "B02"]})
    transform = build_image_transform(preprocess, train=False)
    out = transform(transform.open_image(path))
    with rasterio.open(path) as source:
        raw = source.read([4, 3, 2, 1]).astype(np.float32)
    want = (raw - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    want[0, :2, :2] = 0.0  # nodata pixels are filled with the band mean: 0 after normalising
    assert out.shape == (4, SIZE, SIZE)
    assert torch.allclose(out, torch.from_numpy(want), atol=1e-4)
    # the training data set yields N-band items; an unreadable file is a bad item, not a crash
    records = [ImageTextRecord(str(path), ["x"], 0), ImageTextRecord(str(path) + ".missing", ["x"], 0)]
    dataset = ImageTextDataset(records, transform, train=False)
    batch = Collator()([dataset[0], dataset[1]])
    assert batch["images"].shape == (1, 4, SIZE, SIZE)
    assert batch["bad"] == [(str(path) + ".missing", "file not found")]


def test_decoding_on_the_device_leaves_reader_files_to_the_reader(scenes: Path) -> None:
    """``decode_on`` moves JPEG decoding only: a multispectral model's files keep its reader, the
    same batches as without the option."""
    paths = [str(path) for path in sorted(scenes.rglob("*.tif"))[:3]]
    preprocess = PreprocessConfig(image_size=SIZE, mean=(500.0, 600.0, 700.0, 800.0), std=(100.0, 200.0, 300.0, 400.0),
                                  reader={"name": "geotiff", "bands": ["B08", "B04", "B03", "B02"]})
    default = torch.cat(list(ImagePreparer(preprocess, workers=2).batches(paths, 2)))
    on_device = torch.cat(list(ImagePreparer(preprocess, workers=2, decode_on="cpu").batches(paths, 2)))
    assert default.shape == (3, 4, SIZE, SIZE) and torch.equal(on_device, default)


def test_bad_band_name_names_the_band_and_the_file(scenes: Path, tmp_path: Path) -> None:
    bands = ["B02", "B03", "B04", "B11"]
    data = recipe(scenes, tmp_path / "runs")
    data["model"]["input"]["bands"] = bands
    # found while computing the band statistics from data.train
    with pytest.raises(ValueError, match=r"\.tif: no band named \['B11'\]; the file's bands are \['B02', 'B03', 'B04', 'B08'\]"):
        train(run_config(data))
    # with given statistics, found by the training data set's reader
    data["model"]["input"].update(stats="given", mean=[0.0] * 4, std=[1.0] * 4)
    data["name"] = "given"
    with pytest.raises(ValueError, match=r"scenes/\w+/\w+_\d\.tif: no band named \['B11'\]"):
        train(run_config(data))


def test_input_options_fail_loudly() -> None:
    model = {"kind": "open_clip", "name": "domainclip-tiny-vit"}
    with pytest.raises(ValueError, match=r"model\.input: unknown key 'band'; did you mean 'bands'"):
        create_backbone(ModelConfig(**model, input={"name": "multispectral", "band": BANDS}))
    with pytest.raises(ValueError, match="stats='data'.*no mean/std yet"):
        create_backbone(ModelConfig(**model, input={"name": "multispectral", "bands": BANDS}))
    with pytest.raises(ValueError, match="'multispectal' is not a registered input adapter; did you mean 'multispectral'"):
        create_backbone(ModelConfig(**model, input={"name": "multispectal", "bands": BANDS}))
    with pytest.raises(ValueError, match=r"rgb must name the red, green and blue bands"):
        create_backbone(ModelConfig(**model, input={"name": "multispectral", "bands": ["B1", "B2", "B3", "B4"],
                                                    "mean": [0.0] * 4, "std": [1.0] * 4}))
    adapted = create_backbone(ModelConfig(**model, input={"name": "multispectral", "bands": ["B1", "B2", "B3", "B4"],
                                                          "rgb": ["B3", "B2", "B1"], "mean": [0.0] * 4,
                                                          "std": [1.0] * 4}))
    assert adapted.model.visual.conv1.in_channels == 4
    assert adapted.preprocess.reader == {"name": "geotiff", "bands": ["B1", "B2", "B3", "B4"]}


EUROSAT_MS_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A"]


def test_multispectral_recipe_smoke(tmp_path: Path) -> None:
    """recipes/remote_sensing/multispectral_lora.yaml on fake EuroSAT-MS files (13 undescribed bands)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "eurosat_ms"
    for scene, level in {"Forest": 400, "River": 900, "Industrial": 1600}.items():
        (root / scene).mkdir(parents=True)
        for i in range(3):
            bands = {name: (level + 50 * b + rng.normal(0, 40, (16, 16))).astype(np.uint16)
                     for b, name in enumerate(EUROSAT_MS_BANDS)}
            write_geotiff(root / scene / f"{scene}_{i}.tif", bands, describe=False)
    recipe_file = Path(__file__).resolve().parents[3] / "recipes" / "remote_sensing" / "multispectral_lora.yaml"
    overrides = [f"output_dir={tmp_path / 'runs'}", "model.kind=open_clip", "model.name=domainclip-tiny-vit",
                 f"data.train.path={root}", "data.train.holdout=''", "data.batch_size=4", "data.num_workers=0",
                 "train.max_steps=2", "train.precision='no'", "train.progress=false", "train.tensorboard=false",
                 "train.warmup_steps=0", f"eval.0.data.path={root}", "eval.0.data.holdout=''", "eval.0.batch_size=8"]
    cfg = config_lib.load(RunConfig, recipe_file, overrides)
    assert cfg.model.input["bands"] == ["B02", "B03", "B04", "B08"] and cfg.method.name == "lora"
    result = train(cfg)
    scenes = json.loads((result.run_dir / "metrics.json").read_text())[0]
    assert scenes["dataset"] == "eurosat_ms_test_scenes" and scenes["metrics"]["n_samples"] == 9
    assert 0.0 <= scenes["metrics"]["acc1"] <= 1.0
    saved = config_lib.load(RunConfig, result.run_dir / "config.yaml")
    assert len(saved.model.input["mean"]) == 4 and saved.model.input["file_band_names"] == EUROSAT_MS_BANDS
    # B04 of the fake files is level + 150 on average
    assert 400 < saved.model.input["mean"][2] < 1600
    # `domainclip eval RUN` rebuilds the 4-band model from the run folder: same accuracy
    from domainclip.core.cli import main

    assert main(["eval", str(result.run_dir)]) == 0
    again = json.loads((result.run_dir / "metrics_eval.json").read_text())[0]["metrics"]
    assert again["acc1"] == scenes["metrics"]["acc1"] and again["n_samples"] == 9


def test_torchgeo_statistics_fill_the_input_without_reading_data() -> None:
    pytest.importorskip("torchgeo", reason="torchgeo (extra 'geo') is not installed")
    from domainclip.core.backbones.factory import resolve_model_input

    cfg = ModelConfig(kind="open_clip", name="domainclip-tiny-vit",
                      input={"name": "multispectral", "bands": BANDS, "stats": "torchgeo"})
    resolved = resolve_model_input(cfg, records=None)  # no training data needed
    expected = BandStats.from_torchgeo(BANDS)
    assert resolved.input["mean"] == pytest.approx([float(v) for v in expected.mean])
    assert resolved.input["std"] == pytest.approx([float(v) for v in expected.std])
    model = create_backbone(resolved)
    assert model.preprocess.mean == pytest.approx(tuple(float(v) for v in expected.mean))
    assert model.model.visual.conv1.in_channels == len(BANDS)

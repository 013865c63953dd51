"""GeoTIFF reading (bands by name, nodata, statistics) and N-band CLIP vision towers."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.domains.remote_sensing.band_adapt import adapt_vision_tower, expand_rgb_filters

rasterio = pytest.importorskip("rasterio", reason="rasterio (extra 'geo') is not installed")
from domainclip.domains.remote_sensing.multispectral import BandStats, read_geotiff  # noqa: E402

from ...core.test_backbones import save_tiny_hf  # noqa: E402
from .make_fake_data import write_geotiff  # noqa: E402

BANDS = ["B02", "B03", "B04", "B08"]  # blue, green, red, near infrared
RGB = ("B04", "B03", "B02")


@pytest.fixture
def geotiff(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    bands = {name: (rng.integers(100, 3000, (32, 32)) + 1000 * i).astype(np.uint16) for i, name in enumerate(BANDS)}
    bands["B08"][0, :4] = 0  # nodata pixels
    return write_geotiff(tmp_path / "scene.tif", bands, nodata=0)


def test_read_bands_by_name_with_nodata(geotiff: Path) -> None:
    image = read_geotiff(geotiff, bands=["B08", "B04"])
    assert image.band_names == ["B08", "B04"] and image.shape == (2, 32, 32)
    with rasterio.open(geotiff) as src:
        nir, red = src.read(4).astype(np.float32), src.read(3).astype(np.float32)
    assert np.array_equal(image.array[1], red)
    assert int((~image.valid[0]).sum()) == 4 and np.isnan(image.array[0, 0, :4]).all()
    assert np.array_equal(image.array[0][image.valid[0]], nir[nir != 0])
    with pytest.raises(KeyError, match=r"no band named \['B11'\].*'B02', 'B03', 'B04', 'B08'"):
        read_geotiff(geotiff, bands=["B11"])


def test_unnamed_bands_and_explicit_names(tmp_path: Path) -> None:
    path = write_geotiff(tmp_path / "plain.tif", {"x": np.ones((4, 4), np.float32), "y": np.zeros((4, 4), np.float32)},
                         describe=False)
    assert read_geotiff(path).band_names == ["B1", "B2"]
    assert read_geotiff(path, bands=["nir"], file_band_names=["red", "nir"]).array.max() == 0.0
    with pytest.raises(ValueError, match="file_band_names has 3 names but the file has 2 bands"):
        read_geotiff(path, file_band_names=["a", "b", "c"])


def test_band_statistics_skip_nodata_and_normalise(geotiff: Path) -> None:
    image = read_geotiff(geotiff)
    stats = BandStats.from_images([image, image])
    nir = image.array[3][image.valid[3]].astype(np.float64)
    assert stats.mean[3] == pytest.approx(nir.mean()) and stats.std[3] == pytest.approx(nir.std())
    normalised = stats.normalise(image)
    assert normalised.shape == (4, 32, 32) and torch.all(normalised[3, 0, :4] == 0)
    valid = normalised[3][torch.from_numpy(image.valid[3])]
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-4) and float(valid.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    given = BandStats(BANDS, [0.0] * 4, [1000.0] * 4)
    assert torch.allclose(given.normalise(read_geotiff(geotiff, bands=["B04"])),
                          torch.from_numpy(image.array[2] / 1000.0)[None])


def test_torchgeo_statistics_when_available() -> None:
    pytest.importorskip("torchgeo.datamodules", reason="torchgeo (extra 'geo') is not installed")
    stats = BandStats.from_torchgeo(["B04", "B08"])
    assert stats.band_names == ["B04", "B08"] and all(s > 0 for s in stats.std)


def test_expand_rgb_filters_rule() -> None:
    weight = torch.randn(8, 3, 4, 4)
    expanded = expand_rgb_filters(weight, BANDS, RGB)
    assert torch.equal(expanded[:, 2], weight[:, 0]) and torch.equal(expanded[:, 1], weight[:, 1])
    assert torch.equal(expanded[:, 0], weight[:, 2])
    assert torch.allclose(expanded[:, 3], weight.mean(dim=1) * 3 / 4)
    with pytest.raises(ValueError, match=r"rgb bands \['R'\] are not among"):
        expand_rgb_filters(weight, BANDS, ("R", "B03", "B02"))


def check_rgb_equivalence(backbone, geotiff: Path) -> None:  # noqa: ANN001
    """An N-band tower given zeros on the extra band = the RGB tower on R, G, B; runs on the GeoTIFF."""
    rgb_model = copy.deepcopy(backbone).eval()
    image = read_geotiff(geotiff)
    stats = BandStats.from_images([image])
    adapted = adapt_vision_tower(backbone, BANDS, RGB, stats.mean, stats.std).eval()
    assert adapted.preprocess.channels == 4 and list(adapted.preprocess.mean) == pytest.approx(stats.mean)
    size = adapted.preprocess.image_size
    pixels = torch.nn.functional.interpolate(stats.normalise(image)[None], size=(size, size), mode="bilinear")
    with torch.no_grad():
        features = adapted.encode_image(pixels)
        rgb_only = pixels.clone()
        rgb_only[:, 3] = 0
        expected = rgb_model.encode_image(rgb_only[:, [2, 1, 0]])  # B04, B03, B02 = R, G, B
        assert torch.allclose(adapted.encode_image(rgb_only), expected, atol=1e-5)
    assert features.shape == (1, adapted.embed_dim) and torch.isfinite(features).all()


def test_open_clip_vit_takes_four_bands(geotiff: Path) -> None:
    torch.manual_seed(0)
    check_rgb_equivalence(create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit")), geotiff)


def test_hf_clip_takes_four_bands(geotiff: Path, tmp_path: Path) -> None:
    folder = save_tiny_hf(tmp_path / "hf", "clip")
    backbone = create_backbone(ModelConfig(kind="hf", name=str(folder)))
    check_rgb_equivalence(backbone, geotiff)
    assert backbone.model.config.vision_config.num_channels == 4
    backbone.model.save_pretrained(tmp_path / "exported")  # the exported config records 4 bands
    from transformers import CLIPModel

    reloaded = CLIPModel.from_pretrained(tmp_path / "exported")
    assert reloaded.vision_model.embeddings.patch_embedding.weight.shape[1] == 4
    assert torch.equal(reloaded.vision_model.embeddings.patch_embedding.weight,
                       backbone.model.vision_model.embeddings.patch_embedding.weight)

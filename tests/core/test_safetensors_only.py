"""The kit never unpickles, by its own check (issue 11, section 3).

A payload writes a marker file when unpickled. ``torch.load`` is made permissive here (as a library
passing ``weights_only=False``, or an old torch, would be), so only the kit's own
``require_safetensors`` check stands between the payload and code execution. Every path that
loads weights must refuse it by name, with the ``convert-weights`` hint, and the marker never appears.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from domainclip.core.backbones import create_backbone
from domainclip.core.backbones.factory import ModelConfig
from domainclip.core.checkpoint import UnsafeWeightsError, require_safetensors, save_tensors, weights_format
from domainclip.core.cli import main as cli_main

from ..conftest import tiny_recipe
from ..tiny_models import save_tiny_hf


class _WritesMarker:
    """Unpickling this creates ``marker`` (``open(marker, "w")``): arbitrary code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "UNPICKLED"


@pytest.fixture
def permissive_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    original = torch.load

    def load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        kwargs["weights_only"] = False
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)


def payload(path: Path, marker: Path, raw_pickle: bool = False) -> Path:
    """A checkpoint-looking file that runs code when unpickled (torch zip archive or raw pickle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"state_dict": {"weight": torch.zeros(2)}, "hook": _WritesMarker(marker)}
    if raw_pickle:
        path.write_bytes(pickle.dumps(state, protocol=2))
    else:
        torch.save(state, path)
    return path


def test_the_payload_runs_code_when_loaded_permissively(tmp_path: Path, marker: Path, permissive_torch_load: None) -> None:
    torch.load(payload(tmp_path / "w.pt", marker))
    assert marker.exists()  # so the marker checks below can fail


def test_format_is_read_from_content_not_suffix(tmp_path: Path, marker: Path) -> None:
    real = tmp_path / "real.safetensors"
    save_tensors({"w": torch.ones(3)}, real)
    assert weights_format(real) == "safetensors"
    assert weights_format(payload(tmp_path / "zip.safetensors", marker)) == "pickle"
    assert weights_format(payload(tmp_path / "raw", marker, raw_pickle=True)) == "pickle"
    assert require_safetensors(real) == real
    assert require_safetensors("") == Path("") and require_safetensors("laion2b_s34b_b79k") == Path("laion2b_s34b_b79k")


def _refused(call: Callable[[], object], file: Path, marker: Path) -> None:
    with pytest.raises(UnsafeWeightsError) as error:
        call()
    message = str(error.value)
    assert str(file) in message and "domainclip convert-weights" in message, message
    assert not marker.exists()


@pytest.mark.parametrize("name", ["weights.PT", "weights.pt.tar", "weights", "pickled.safetensors"])
def test_open_clip_pretrained_file(tmp_path: Path, marker: Path, permissive_torch_load: None, name: str) -> None:
    file = payload(tmp_path / name, marker, raw_pickle=name == "weights")
    _refused(lambda: create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit", pretrained=str(file))),
             file, marker)


def test_open_clip_local_dir_folder(tmp_path: Path, marker: Path, permissive_torch_load: None) -> None:
    folder = tmp_path / "oc"
    file = payload(folder / "open_clip_pytorch_model.bin", marker)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": {}}))
    _refused(lambda: create_backbone(ModelConfig(kind="open_clip", name=f"local-dir:{folder}")), file, marker)


@pytest.fixture
def pickled_hf_folder(tmp_path: Path, marker: Path) -> tuple[Path, Path]:
    """A tiny Hugging Face CLIP folder whose weights are only a (malicious) ``pytorch_model.bin``."""
    folder = save_tiny_hf(tmp_path / "hf", "clip")
    (folder / "model.safetensors").unlink()
    return folder, payload(folder / "pytorch_model.bin", marker)


def test_hf_folder_backbone_and_zero_shot_api(pickled_hf_folder: tuple[Path, Path], marker: Path,
                                              permissive_torch_load: None) -> None:
    from domainclip.core.zeroshot import ZeroShotClassifier

    folder, file = pickled_hf_folder
    for kind in ("hf", "siglip2"):
        _refused(lambda: create_backbone(ModelConfig(kind=kind, name=str(folder))), file, marker)
    _refused(lambda: ZeroShotClassifier.from_pretrained(folder), file, marker)


def test_classify_cli_on_a_pickled_hf_folder(pickled_hf_folder: tuple[Path, Path], marker: Path, tmp_path: Path,
                                             permissive_torch_load: None, capsys: pytest.CaptureFixture[str]) -> None:
    folder, file = pickled_hf_folder
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    assert cli_main(["classify", str(image), "--model", str(folder), "--labels", "a,b"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(file) in err and "convert-weights" in err
    assert not marker.exists()


def test_dual_encoder_text_folder_and_vision_weights(pickled_hf_folder: tuple[Path, Path], marker: Path,
                                                     tmp_path: Path, permissive_torch_load: None) -> None:
    folder, file = pickled_hf_folder
    _refused(lambda: create_backbone(ModelConfig(kind="dual_encoder", vision="open_clip:domainclip-tiny-vit",
                                                 text=str(folder), embed_dim=16)), file, marker)
    vision = payload(tmp_path / "vision.pth", marker)
    _refused(lambda: create_backbone(ModelConfig(kind="dual_encoder", vision="open_clip:domainclip-tiny-vit",
                                                 vision_pretrained=str(vision), text=str(folder))), vision, marker)


def test_model_weights_and_teacher(tmp_path: Path, marker: Path, permissive_torch_load: None) -> None:
    from domainclip.core.methods.cross_lingual import TeacherConfig, TeacherLearning

    file = payload(tmp_path / "model.safetensors", marker)  # a pickle under a safetensors name
    _refused(lambda: create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit", weights=str(file))),
             file, marker)
    student = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit"))
    teacher = TeacherLearning(TeacherConfig(teacher_model={"kind": "open_clip", "name": "domainclip-tiny-vit",
                                                           "pretrained": str(file)}))
    _refused(lambda: teacher._teacher(student), file, marker)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ..conftest import write_colour_squares

    root = tmp_path_factory.mktemp("run")
    manifest = write_colour_squares(root / "data", count=12)
    recipe = tiny_recipe(manifest, root / "runs", max_steps=2)
    recipe["eval"] = [{"name": "squares", "task": "zeroshot", "batch_size": 8,
                       "data": {"format": "csv", "path": str(manifest), "label_key": "label", "caption_separator": "|",
                                "templates": ["a {} square"]}}]
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli_main(["train", str(path)]) == 0
    return root / "runs" / "tiny"


@pytest.fixture
def tampered_run(finished_run: Path, tmp_path: Path, marker: Path) -> tuple[Path, Path]:
    """A copy of a finished run whose trained weights were replaced by a pickle payload."""
    run = Path(shutil.copytree(finished_run, tmp_path / "tampered"))
    file = run / "model" / "trainable.safetensors"
    payload(file, marker)
    return run, file


def test_run_folder_consumers(tampered_run: tuple[Path, Path], marker: Path, tmp_path: Path,
                              permissive_torch_load: None) -> None:
    from domainclip.core.export import export_run
    from domainclip.core.publish import publish_run
    from domainclip.core.wise_ft import wise_ft_sweep
    from domainclip.core.zeroshot import ZeroShotClassifier

    run, file = tampered_run
    _refused(lambda: ZeroShotClassifier.from_pretrained(run), file, marker)
    _refused(lambda: wise_ft_sweep(run, [0.0, 1.0], "squares", tmp_path / "wise"), file, marker)
    for fmt in ("open_clip", "adapter"):
        _refused(lambda: export_run(run, fmt, tmp_path / f"export_{fmt}"), file, marker)
    _refused(lambda: publish_run(run, "org/name", dry_run=tmp_path / "publish"), file, marker)


def test_run_whose_recipe_names_a_pickle(finished_run: Path, tmp_path: Path, marker: Path,
                                         permissive_torch_load: None, capsys: pytest.CaptureFixture[str]) -> None:
    run = Path(shutil.copytree(finished_run, tmp_path / "edited"))
    file = payload(tmp_path / "base.bin", marker)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["pretrained"] = str(file)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(file) in err and "convert-weights" in err
    assert not marker.exists()

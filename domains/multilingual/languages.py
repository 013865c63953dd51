"""Per-language prompt templates and class names, read from data files (one YAML per language).

A language is a file ``<code>.yaml`` in ``domains/multilingual/languages/`` or in a folder named
by the environment variable ``DOMAINCLIP_LANGUAGE_DIRS`` (several separated by ``os.pathsep``;
later folders win). Adding a language means adding a file; no code changes::

    language: de
    name: Deutsch
    domains:
      rsicd_scenes:
        templates: ["Ein Luftbild. Zu sehen ist {}.", ...]     # one "{}" each
        class_names: {airport: ein Flughafen, ...}              # raw class key -> name

``en.yaml`` is the reference: a language may cover fewer domains, but a domain it covers must
name exactly the reference's classes (so zero-shot heads line up across languages). Class keys
are the data's raw class names, so a localised class map is the ``class_names`` of a data source
(:func:`localise`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from domainclip.core.data.sources import DataSourceConfig

PACKAGE_DIR = Path(__file__).parent / "languages"
ENV_DIRS = "DOMAINCLIP_LANGUAGE_DIRS"
REFERENCE = "en"


@dataclass(frozen=True)
class DomainPrompts:
    """One domain's prompts in one language: templates and ``{raw class key: class name}``."""

    templates: tuple[str, ...]
    class_names: dict[str, str]


@dataclass(frozen=True)
class LanguagePack:
    """Everything one language file holds."""

    code: str
    name: str
    domains: dict[str, DomainPrompts]
    path: str

    def domain(self, name: str) -> DomainPrompts:
        if name not in self.domains:
            raise KeyError(f"language {self.code!r} ({self.path}) has no domain {name!r}; "
                           f"it has {sorted(self.domains)}")
        return self.domains[name]


def language_dirs() -> list[Path]:
    """Folders searched for language files: the package's, then ``$DOMAINCLIP_LANGUAGE_DIRS``."""
    extra = [Path(p).expanduser() for p in os.environ.get(ENV_DIRS, "").split(os.pathsep) if p.strip()]
    return [PACKAGE_DIR, *extra]


def language_files() -> dict[str, Path]:
    """``{code: file}`` for every language file found (a later folder overrides an earlier one)."""
    found: dict[str, Path] = {}
    for folder in language_dirs():
        if folder.is_dir():
            found.update({path.stem: path for path in sorted(folder.glob("*.yaml"))})
    return found


def available_languages() -> list[str]:
    """Codes of every language with a file."""
    return sorted(language_files())


def parse_language(path: Path) -> LanguagePack:
    """Read and validate one language file (structure and templates; class keys: :func:`load_language`)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
        raise ValueError(f"{path}: expected a mapping with 'language', 'name' and 'domains'")
    code = str(data.get("language", path.stem))
    if code != path.stem:
        raise ValueError(f"{path}: 'language: {code}' does not match the file name (expected {path.stem!r})")
    domains: dict[str, DomainPrompts] = {}
    for domain, entry in data["domains"].items():
        where = f"{path}: domains.{domain}"
        if not isinstance(entry, dict) or not isinstance(entry.get("templates"), list) \
                or not isinstance(entry.get("class_names"), dict):
            raise ValueError(f"{where}: needs 'templates' (a list) and 'class_names' (a mapping)")
        for template in entry["templates"]:
            if not isinstance(template, str) or template.count("{}") != 1:
                raise ValueError(f"{where}.templates: {template!r} must be a string with exactly one '{{}}'")
        names = {str(k): str(v).strip() for k, v in entry["class_names"].items()}
        empty = sorted(k for k, v in names.items() if not v)
        if empty:
            raise ValueError(f"{where}.class_names: empty names for {empty}")
        domains[str(domain)] = DomainPrompts(tuple(entry["templates"]), names)
    return LanguagePack(code, str(data.get("name", code)), domains, str(path))


@lru_cache(maxsize=None)
def _load(code: str, path: str) -> LanguagePack:
    pack = parse_language(Path(path))
    if code == REFERENCE:
        return pack
    reference = load_language(REFERENCE)
    for domain, prompts in pack.domains.items():
        if domain not in reference.domains:
            raise ValueError(f"{path}: domain {domain!r} is not in the reference {reference.path} "
                             f"(domains: {sorted(reference.domains)})")
        want = set(reference.domains[domain].class_names)
        missing, extra = sorted(want - set(prompts.class_names)), sorted(set(prompts.class_names) - want)
        if missing or extra:
            raise ValueError(f"{path}: domains.{domain}.class_names must have the reference's keys; "
                             f"missing {missing}, unknown {extra}")
    return pack


def load_language(code: str) -> LanguagePack:
    """The validated language pack of ``code`` (``de``, ``zh``...)."""
    files = language_files()
    if code not in files:
        raise ValueError(f"no language file for {code!r}; available: {sorted(files)} "
                         f"(add {code}.yaml to {PACKAGE_DIR} or to a folder in ${ENV_DIRS})")
    return _load(code, str(files[code]))


def localise(source: DataSourceConfig, language: str, domain: str) -> DataSourceConfig:
    """``source`` with the class names and templates of ``domain`` in ``language``."""
    prompts = load_language(language).domain(domain)
    return dataclasses.replace(source, class_names=dict(prompts.class_names), templates=list(prompts.templates))


def localised_prompts(language: str, domain: str, class_keys: list[str]) -> tuple[list[str], list[str]]:
    """``(class names in the order of class_keys, templates)`` for a zero-shot head in ``language``."""
    prompts = load_language(language).domain(domain)
    missing = [key for key in class_keys if key not in prompts.class_names]
    if missing:
        raise KeyError(f"language {language!r} domain {domain!r} has no names for classes {missing}")
    return [prompts.class_names[key] for key in class_keys], list(prompts.templates)

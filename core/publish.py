"""``domainclip publish``: a run exported, with its card, to a Hugging Face Hub repository.

The uploaded folder is exactly what :func:`stage_folder` writes: the exported model
(``domainclip.core.export.export_run``), ``README.md`` (the card, with loading instructions for
the repo id) and ``metadata.json``. ``--dry-run DIR`` writes that folder and uploads nothing.

Nothing local leaves the machine: before anything is uploaded, every string value in the staged
JSON files that is a local path (the adapter manifest's local base weights, a method's teacher
data, parallel captions or cache folder) becomes ``[local path withheld]``, the text files lose any
of this machine's paths, and the folder is refused when a file still holds one (home, working
directory, temp folder, the kit's folder, the run folder, or an absolute path of the recipe). A
tokenizer's vocabulary files (``tokenizer.json``, ``vocab.json``, ``merges.txt``, SentencePiece
models) are never changed, only checked: their tokens (``/</w>``) and regular expressions are no
paths, and withholding them would break the published tokenizer.

The folder is all or nothing: the card (config, ``--domain``, template) is rendered before the
export starts, and the folder is written under a hidden sibling name and renamed into place only
when complete, so a failed ``--dry-run`` leaves its folder as it was.
``pipeline_tag: zero-shot-image-classification`` is set only when transformers' pipeline loads
the staged folder.

Upload: ``HfApi.create_repo`` (``private`` applies when the repo is created; publishing with
``private=True`` to an existing *public* repo is refused rather than exposing the model),
``HfApi.upload_folder`` (one commit; remote files not in the folder stay), then
``HfApi.create_tag`` on that commit when a revision tag is given.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import replace_folder
from .cards import CardConfig, card_config, card_text, looks_like_path, scrub_text, write_card
from .export import export_run, formats_for_kind
from .export.adapter_format import WITHHELD
from .export.common import read_run, require_new_folder

LOCAL_PATH_WITHHELD = WITHHELD
TEXT_SUFFIXES = (".json", ".md", ".txt", ".yaml", ".yml", ".jinja", ".py")
PIPELINE_TAG = "zero-shot-image-classification"

KIT_FOLDER = Path(__file__).resolve().parents[1]  # the installed domainclip package (or its checkout)
# a tokenizer's vocabulary files: their strings are tokens, merges ("/</w>", "//</w>", "▁./") and
# pre-tokenizer regular expressions, never machine data, so nothing in them is withheld (they are
# still checked for this machine's paths); ``tokenizer_config.json`` is scrubbed as any JSON file
VOCABULARY_FILES = ("vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model", "bpe_simple_vocab_16e6.txt.gz")
TOKENIZER_JSON = "tokenizer.json"

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


def check_repo_id(repo_id: str) -> str:
    """``ORG/NAME`` with letters, digits, ``.``, ``_``, ``-``; a ``ValueError`` naming the value otherwise."""
    if not REPO_ID.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise ValueError(f"--repo-id {repo_id!r} is not a Hugging Face repo id: expected ORG/NAME "
                         f"(letters, digits, '.', '_', '-'), e.g. my-lab/chest-xray-clip")
    return repo_id


def check_tag(tag: str) -> str:
    """A git tag name (``v1.0``, ``release/2025-01``); a ``ValueError`` naming the value otherwise."""
    if tag and (not TAG.match(tag) or ".." in tag or tag.endswith((".lock", "/", "."))):
        raise ValueError(f"--revision {tag!r} is not a valid tag name: use letters, digits, '.', '_', '-', '/' "
                         f"(e.g. v1.0)")
    return tag


def default_format(run_dir: str | Path) -> str:
    """The full export format that fits the run's backbone (``open_clip``, ``hf`` or ``dual_encoder``)."""
    cfg, _ = read_run(run_dir)
    return formats_for_kind(cfg.model.kind)[0]


def usage_text(fmt: str, repo_id: str) -> str:
    """How to load the published folder, for the card's *How to use* section."""
    snippets = {
        "open_clip": ("open_clip", f'import open_clip\n\nmodel, _, preprocess = open_clip.create_model_and_transforms('
                                   f'"hf-hub:{repo_id}")\ntokenizer = open_clip.get_tokenizer("hf-hub:{repo_id}")'),
        "hf": ("transformers", f'from transformers import pipeline\n\nclassifier = pipeline('
                               f'"zero-shot-image-classification", model="{repo_id}")\n'
                               f'classifier("image.png", candidate_labels=["...", "..."])'),
        "adapter": ("domainclip (adapter only: refuses any base but the pinned one)",
                    f'from huggingface_hub import snapshot_download\nfrom domainclip.core.export import load_adapter\n\n'
                    f'model, method = load_adapter(snapshot_download("{repo_id}"))'),
        "dual_encoder": ("domainclip (dual-encoder format)",
                         f'from huggingface_hub import snapshot_download\n'
                         f'from domainclip.core.backbones import ModelConfig, create_backbone\n\n'
                         f'model = create_backbone(ModelConfig(kind="compact_base", name=snapshot_download("{repo_id}")))'),
    }
    library, code = snippets[fmt]
    return f"Format `{fmt}`, loaded with {library}:\n\n```python\n{code}\n```"


def machine_paths(run_dir: str | Path) -> list[str]:
    """This machine's paths that must not leave it: home, working directory, temp folder, the kit's
    folder, the run folder, and every absolute path in the run's resolved recipe (data, caches)."""
    run_dir = Path(run_dir)
    paths = {str(Path.home()), os.getcwd(), tempfile.gettempdir(), str(run_dir.resolve()), str(KIT_FOLDER)}
    for path in list(paths):
        paths.add(os.path.realpath(path))
    config = run_dir / "config.yaml"
    if config.is_file():
        for value in _strings(yaml.safe_load(config.read_text())):
            if value.startswith("/") and len(Path(value).parts) > 2:
                paths.add(value.rstrip("/"))
    return sorted((p for p in paths if p not in ("/", "")), key=len, reverse=True)


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


# characters no real file path is written with (a tokenizer's "/</w>", a regex's "[^\\s]|...")
NOT_IN_PATHS = set('<>|*?"\n\r\t')
WINDOWS_PATH = re.compile(r"^([a-z]:[\\/]|\\\\[^\\]+\\)", re.IGNORECASE)


def is_local_path(value: str, forbidden: Iterable[str] = ()) -> bool:
    """A string that names a file or folder on this machine: one holding a ``forbidden`` path, an
    absolute path (``/...``, ``C:\\...``, ``\\\\server\\...``), a home path (``~/...``), a relative
    path of several folders, or one that exists here; not a hub id, URL, model name, token
    (``/</w>``) or regular expression."""
    if any(p in value for p in forbidden):
        return True
    if not value or len(value) > 4096 or any(c.isspace() or c in NOT_IN_PATHS for c in value):
        return False
    if not looks_like_path(value) and "/" not in value:
        return False
    if re.match(r"^[a-z][a-z0-9+.-]*://", value, re.IGNORECASE):
        return False  # a URL
    if WINDOWS_PATH.match(value) or value == "~" or value.startswith("~/"):
        return True
    if value.startswith("/"):
        return any(part.strip(".") for part in value.split("/"))  # "/" and "//" alone are no paths
    if "\\" in value:
        return False  # a backslash outside a Windows path: an escape, not a folder separator
    # a relative path of several folders names local data even where it does not resolve from here
    # (``train/patient00042/view1.jpg``); one folder deep (a hub id, ``org/name``) only if it exists
    return value.count("/") >= 2 or Path(value).exists()


def is_vocabulary(name: str) -> bool:
    """A tokenizer's vocabulary file (``tokenizer.json``, ``vocab.json``, ``merges.txt``...): its
    strings are tokens, merges and regular expressions, which no path withholding may touch."""
    return Path(name).name in (TOKENIZER_JSON, *VOCABULARY_FILES)


def _withhold(value: Any, forbidden: list[str]) -> tuple[Any, int]:
    if isinstance(value, str):
        return (LOCAL_PATH_WITHHELD, 1) if is_local_path(value, forbidden) else (value, 0)
    if isinstance(value, dict):
        pairs = {k: _withhold(v, forbidden) for k, v in value.items()}
        return {k: p[0] for k, p in pairs.items()}, sum(p[1] for p in pairs.values())
    if isinstance(value, list):
        pairs = [_withhold(v, forbidden) for v in value]
        return [p[0] for p in pairs], sum(p[1] for p in pairs)
    return value, 0


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        return handle.read(min(size, 100_000_000))


def _left_paths(content: bytes, forbidden: list[str], vocabulary: bool) -> list[str]:
    """The ``forbidden`` paths ``content`` still holds. In a vocabulary only a path *inside* one of
    them counts (``/tmp/x``): a token that merely spells a folder's name (``/tmp``) is no leak."""
    if not vocabulary:
        return [p for p in forbidden if p.encode() in content]
    return [p for p in forbidden if re.search(re.escape(p.encode()) + rb"[/\\][\w.~-]", content)]


def scrub_staged(folder: str | Path, forbidden: list[str]) -> dict[str, int]:
    """Withhold local paths in every staged file; refuse (``ValueError`` naming the file and the
    path) when one remains. Returns the number of values withheld per file.

    A tokenizer's vocabulary files (:func:`is_vocabulary`) are never changed (a withheld token or
    merge breaks the tokenizer), only checked for this machine's paths."""
    folder = Path(folder)
    withheld: dict[str, int] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        vocabulary = is_vocabulary(name)
        if vocabulary:
            pass
        elif path.suffix == ".json":
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"publish: staged file {name} is not valid JSON ({error}); refusing to upload "
                                 f"a file whose local paths cannot be checked") from None
            data, hits = _withhold(data, forbidden)
            if hits:
                path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
                withheld[name] = hits
        elif path.suffix in TEXT_SUFFIXES:
            text = path.read_text()
            hits = sum(text.count(p) for p in forbidden)
            if hits:
                for p in forbidden:  # longest first: a run folder inside the home folder goes whole
                    text = text.replace(p, LOCAL_PATH_WITHHELD)
                path.write_text(text)
                withheld[name] = hits
        content = _safetensors_header(path) if path.suffix == ".safetensors" else path.read_bytes()
        left = _left_paths(content, forbidden, vocabulary)
        if left:
            raise ValueError(f"publish: staged file {name} still holds the local path {left[0]!r}; refusing to "
                             f"upload it (remove the path from the run's config or metadata and publish again)")
    return withheld


def pipeline_loads(folder: str | Path) -> bool:
    """True when ``transformers.pipeline("zero-shot-image-classification", model=folder)`` loads the folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return False
    try:
        from transformers import pipeline
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            pipeline(PIPELINE_TAG, model=str(folder), device="cpu")
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception:  # noqa: BLE001 - any failure means "not loadable": the tag is left out
        return False
    return True


def stage_folder(run_dir: str | Path, out: str | Path, fmt: str, repo_id: str,
                 card: CardConfig | str | Path | None = None, domain: str = "", license_id: str = "") -> Path:
    """Write the folder that ``publish`` uploads: export + ``README.md`` + ``metadata.json``.

    ``out`` must not exist or be empty (a stale file would be uploaded too). The card config,
    ``domain`` and template are checked before anything is exported, and the folder is written in a
    hidden sibling that becomes ``out`` only when complete: a failure leaves ``out`` as it was.
    """
    out = require_new_folder(out)
    name = repo_id.split("/")[1]
    card_cfg = card_config(run_dir, card, name=name, domain=domain, license=license_id)
    card_text(run_dir, card_cfg, usage=usage_text(fmt, repo_id))  # a card error, before the export
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.staging-{uuid.uuid4().hex[:8]}")
    try:
        export_run(run_dir, fmt, tmp)
        tag = PIPELINE_TAG if pipeline_loads(tmp) else ""
        write_card(run_dir, tmp, card_cfg, usage=usage_text(fmt, repo_id), pipeline_tag=tag)
        scrub_staged(tmp, machine_paths(run_dir))
        replace_folder(tmp, out)  # ``out`` is absent or empty (checked above)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def folder_files(folder: Path) -> list[str]:
    """Every file under ``folder``, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def upload(folder: Path, repo_id: str, private: bool, revision: str, message: str, token: str | None = None) -> dict[str, Any]:
    """Create (or reuse) the repo, upload ``folder`` in one commit, tag it; returns what was done."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    if private and not api.repo_info(repo_id, repo_type="model").private:
        raise ValueError(f"--private was given but the repo {repo_id} already exists and is public; refusing to "
                         f"upload (make it private on the Hub first, or publish without --private)")
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=message)
    if revision:
        api.create_tag(repo_id, tag=revision, revision=commit.oid, repo_type="model")
    return {"url": str(url), "commit": commit.oid, "tag": revision or None}


def publish_run(run_dir: str | Path, repo_id: str, fmt: str = "", private: bool = False, revision: str = "",
                dry_run: str | Path | None = None, card: CardConfig | str | Path | None = None, domain: str = "",
                license_id: str = "", token: str | None = None) -> dict[str, Any]:
    """Export ``run_dir`` with its card and upload it to ``repo_id`` (or only write it, ``dry_run``).

    ``fmt`` defaults to the full format of the run's backbone; ``card`` is a :class:`CardConfig`
    or its YAML file (default ``RUN/card.yaml`` when present).
    """
    run_dir = Path(run_dir)
    check_repo_id(repo_id)
    check_tag(revision)
    fmt = fmt or default_format(run_dir)
    result: dict[str, Any] = {"repo_id": repo_id, "format": fmt, "private": private, "revision": revision or None}
    if dry_run:
        try:
            require_new_folder(dry_run)
        except FileExistsError:
            raise ValueError(f"--dry-run folder {dry_run} exists and is not empty; give a new or empty folder "
                             f"(it must hold exactly what would be uploaded)") from None
        folder = stage_folder(run_dir, dry_run, fmt, repo_id, card, domain, license_id)  # all or nothing
        return {**result, "dry_run": True, "folder": str(folder), "files": folder_files(folder)}
    with tempfile.TemporaryDirectory(prefix="domainclip-publish-") as tmp:
        folder = stage_folder(run_dir, Path(tmp) / "upload", fmt, repo_id, card, domain, license_id)
        message = f"domainclip publish: run {scrub_text(run_dir.name)[0]} as {fmt}"
        done = upload(folder, repo_id, private, revision, message, token)
        return {**result, "dry_run": False, "files": folder_files(folder), **done}

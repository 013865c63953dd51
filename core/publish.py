"""``domainclip publish``: a run exported, with its card, to a Hugging Face Hub repository.

The uploaded folder is exactly what :func:`stage_folder` writes: the exported model
(``domainclip.core.export.export_run``), ``README.md`` (the card, with loading instructions for
the repo id) and ``metadata.json``. ``--dry-run DIR`` writes that folder and uploads nothing.

Upload: ``HfApi.create_repo`` (``private`` applies when the repo is created; publishing with
``private=True`` to an existing *public* repo is refused rather than exposing the model),
``HfApi.upload_folder`` (one commit; remote files not in the folder stay), then
``HfApi.create_tag`` on that commit when a revision tag is given.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from .cards import CardConfig, scrub_text, write_card
from .export import export_run, formats_for_kind
from .export.common import read_run, require_new_folder

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


def stage_folder(run_dir: str | Path, out: str | Path, fmt: str, repo_id: str,
                 card: CardConfig | str | Path | None = None, domain: str = "", license_id: str = "") -> Path:
    """Write the folder that ``publish`` uploads: export + ``README.md`` + ``metadata.json``.

    ``out`` must not exist or be empty (a stale file would be uploaded too).
    """
    out = Path(out)
    export_run(run_dir, fmt, out)
    write_card(run_dir, out, card, usage=usage_text(fmt, repo_id), name=repo_id.split("/")[1],
               domain=domain, license=license_id)
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
        folder = stage_folder(run_dir, dry_run, fmt, repo_id, card, domain, license_id)
        return {**result, "dry_run": True, "folder": str(folder), "files": folder_files(folder)}
    with tempfile.TemporaryDirectory(prefix="domainclip-publish-") as tmp:
        folder = stage_folder(run_dir, Path(tmp) / "upload", fmt, repo_id, card, domain, license_id)
        message = f"domainclip publish: run {scrub_text(run_dir.name)[0]} as {fmt}"
        done = upload(folder, repo_id, private, revision, message, token)
        return {**result, "dry_run": False, "files": folder_files(folder), **done}

"""Find recipes: a YAML path, or the name of a recipe bundled with the kit (``remote_sensing/full``)."""
from __future__ import annotations

from pathlib import Path

import domainclip.recipes as bundled


def resolve_recipe(spec: str) -> Path:
    """A recipe path, or a bundled recipe name such as ``remote_sensing/full``."""
    path = Path(spec)
    if path.is_file():
        return path
    for root in bundled.__path__:
        candidate = Path(root) / (spec if spec.endswith(".yaml") else f"{spec}.yaml")
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"recipe {spec!r}: no such file and no bundled recipe of that name "
                            f"(bundled recipes: {', '.join(list_recipes()) or 'none'})")


def list_recipes() -> list[str]:
    names = []
    for root in bundled.__path__:
        names += [str(p.relative_to(root).with_suffix("")) for p in Path(root).rglob("*.yaml")]
    return sorted(names)

"""Backbone families, one package each, found by scanning this folder.

A family package registers its :class:`~domainclip.core.backbones.base.Backbone` subclasses with
``@register_backbone(kind)`` when imported; nothing outside the package names it, so adding a
family is adding a folder here (see docs/extending.md).
"""
from __future__ import annotations

import importlib
import pkgutil

FAMILIES: list[str] = []
"""Names of the family packages imported, in import order."""


def _import_families() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda module: module.name):
        if info.ispkg:
            importlib.import_module(f"{__name__}.{info.name}")
            FAMILIES.append(info.name)


_import_families()

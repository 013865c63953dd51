"""Domain plugins: ``domainclip.domains.<name>`` packages that register formats and transforms.

Core never imports a domain by name. When a recipe names a data format or an augmentation that
core does not know, :func:`load_domain_plugins` imports every domain package once (each
registers its names on import) and the lookup is tried again.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil

log = logging.getLogger("domainclip.plugins")
_LOADED: list[str] = []


def load_domain_plugins() -> list[str]:
    """Import every ``domainclip.domains.*`` package (once); returns the names imported."""
    if _LOADED:
        return list(_LOADED)
    try:
        import domainclip.domains as domains
    except ImportError:  # an installation without the domains folder
        return []
    for info in pkgutil.iter_modules(domains.__path__):
        if not info.ispkg:
            continue
        try:
            importlib.import_module(f"{domains.__name__}.{info.name}")
        except Exception as error:  # a broken domain must not hide the others' names
            log.warning("domain plugin %s could not be imported: %s: %s", info.name, type(error).__name__, error)
            continue
        _LOADED.append(info.name)
    return list(_LOADED)

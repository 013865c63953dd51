"""Domain plugins: ``domainclip.domains.<name>`` packages that register formats and transforms.

Core never imports a domain by name. When a recipe names a data format or an augmentation that
core does not know, :func:`load_domain_plugins` imports every domain package once (each
registers its names on import) and the lookup is tried again.
"""
from __future__ import annotations

import difflib
import importlib
import logging
import pkgutil
from collections.abc import Callable, Collection

log = logging.getLogger("domainclip.plugins")
_LOADED: list[str] = []
_FAILED: dict[str, str] = {}  # domain -> why its import failed
_SCANNED = False


def load_domain_plugins() -> list[str]:
    """Import every ``domainclip.domains.*`` package (once); returns the names imported."""
    global _SCANNED
    if _SCANNED:
        return list(_LOADED)
    _SCANNED = True
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
            _FAILED[info.name] = f"{type(error).__name__}: {error}"
            log.warning("domain plugin %s could not be imported: %s", info.name, _FAILED[info.name])
            continue
        _LOADED.append(info.name)
    return list(_LOADED)


def require_registered(name: str, registry: Collection[str] | Callable[[], Collection[str]], unknown: str,
                       valid: str = "valid") -> None:
    """Return when ``name`` is in ``registry`` (a live collection, or a function returning the
    names), importing the domains first if it is not yet; else raise ``ValueError``: ``unknown``
    (what is wrong), the closest valid name, the valid names, and the domains whose import
    failed (their names would be missing)."""
    names = registry() if callable(registry) else registry
    if name in names:
        return
    load_domain_plugins()
    names = registry() if callable(registry) else registry
    if name in names:
        return
    close = difflib.get_close_matches(str(name), list(names), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    failed = "; ".join(f"{domain} ({why})" for domain, why in _FAILED.items())
    broken = f"; domain packages that failed to import: {failed}" if failed else ""
    raise ValueError(f"{unknown}{hint} ({valid}: {', '.join(sorted(names))}){broken}")

"""Progress bars for long commands (``eval``, ``compare``): tqdm on stderr, with counts and ETA.

Bars show only on a terminal (stderr is a TTY) and never under ``--quiet``
(:func:`set_quiet`), so logs and pipes stay clean.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_QUIET = False


def set_quiet(quiet: bool) -> None:
    """``True``: no progress bars in this process (``--quiet``)."""
    global _QUIET
    _QUIET = bool(quiet)


def progress(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
             stream: IO[str] | None = None) -> Iterator[T]:
    """``items`` with a bar ``desc: done/total [elapsed<ETA]`` on ``stream`` (default stderr) when it
    is a terminal and the process is not quiet; else ``items`` unchanged."""
    stream = stream if stream is not None else sys.stderr
    shown = not _QUIET and bool(getattr(stream, "isatty", lambda: False)())
    if not shown:
        yield from items
        return
    bar: Any = tqdm(items, total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, leave=True)
    try:
        yield from bar
    finally:
        bar.close()

"""``domainclip serve``: load the model (and index), then run the app on uvicorn.

uvicorn handles SIGTERM and SIGINT: it stops accepting connections, lets requests in flight
finish (up to ``GRACEFUL_SECONDS``), runs the app's shutdown (the micro-batcher's worker is
joined); ``serve`` then returns and the command exits with status 0.
"""
from __future__ import annotations

import os

from fastapi import FastAPI

from ..index.encoding import Encoder
from ..index.search import SearchIndex
from .app import ServeSettings, create_app

GRACEFUL_SECONDS = 10


def build_app(model: str, index: str | None = None, settings: ServeSettings | None = None) -> FastAPI:
    """Load MODEL (and the index, refused when built with other weights) and build the app."""
    settings = settings or ServeSettings()
    encoder = Encoder.load(model, device=settings.device)
    search_index = SearchIndex.open(index, encoder) if index else None
    encoder.fingerprint()  # hash the weights now, not in the first request
    return create_app(encoder, search_index, settings)


def serve(model: str, index: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          settings: ServeSettings | None = None) -> None:
    """Serve until SIGTERM / SIGINT (one process; see docs/serve.md for several workers)."""
    import signal

    import uvicorn

    app = build_app(model, index, settings)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it found:
    # with this one installed the process then ends with status 0 instead of dying by the signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=GRACEFUL_SECONDS)


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory --workers N domainclip.core.serve.server:app_from_env``.

    Reads ``DOMAINCLIP_SERVE_MODEL`` (required), ``DOMAINCLIP_SERVE_INDEX``,
    ``DOMAINCLIP_SERVE_MAX_BATCH`` and ``DOMAINCLIP_SERVE_MAX_WAIT_MS``.
    """
    model = os.environ.get("DOMAINCLIP_SERVE_MODEL", "")
    if not model:
        raise ValueError("set DOMAINCLIP_SERVE_MODEL to the model to serve (run folder, model folder or id)")
    settings = ServeSettings(max_batch=int(os.environ.get("DOMAINCLIP_SERVE_MAX_BATCH", "16")),
                             max_wait_ms=float(os.environ.get("DOMAINCLIP_SERVE_MAX_WAIT_MS", "5")))
    return build_app(model, os.environ.get("DOMAINCLIP_SERVE_INDEX") or None, settings)

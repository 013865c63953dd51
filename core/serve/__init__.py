"""The HTTP service of ``domainclip serve``: classification, embeddings, search and a web page.

See ``docs/serve.md``.
"""
from .app import ServeSettings, create_app
from .batcher import MicroBatcher
from .limits import Limits, RequestError
from .server import app_from_env, build_app, serve

__all__ = ["Limits", "MicroBatcher", "RequestError", "ServeSettings", "app_from_env", "build_app", "create_app",
           "serve"]

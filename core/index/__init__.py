"""Embedding indexes: ``domainclip index`` (encode data into FAISS) and ``domainclip search``.

    encoder = Encoder.load("runs/my-run")
    build_index(encoder, "photos/", "indexes/photos")
    hits = SearchIndex.open("indexes/photos", encoder).search_text("a flooded field", top_k=5)

See ``docs/serve.md``.
"""
from .build import IndexOptions, build_index
from .encoding import Encoder, load_for_encoding
from .faiss_index import FLAT_MAX_VECTORS, choose_kind
from .manifest import IndexManifest, ModelMismatchError, read_manifest
from .search import SearchIndex, plot_grid

__all__ = ["FLAT_MAX_VECTORS", "Encoder", "IndexManifest", "IndexOptions", "ModelMismatchError", "SearchIndex",
           "build_index", "choose_kind", "load_for_encoding", "plot_grid", "read_manifest"]

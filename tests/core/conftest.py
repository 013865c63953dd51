"""Fixtures of tests/core shared across modules (loaded once per session)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def compact_encoder():
    """The bundled compact base as an index/serve ``Encoder`` on the CPU (loading takes seconds: shared)."""
    pytest.importorskip("faiss")
    from domainclip.core.index import Encoder

    return Encoder.load("compact_base", device="cpu")


@pytest.fixture(scope="session")
def colour_index(compact_encoder, tmp_path_factory):
    """An index of 20 colour squares + 1 unreadable file, built with the compact base."""
    from domainclip.core.index import IndexOptions, build_index

    from .index_fixtures import DATA_OPTIONS, colour_data

    root = tmp_path_factory.mktemp("colour_index")
    manifest = colour_data(root / "data")
    build_index(compact_encoder, str(manifest), root / "index",
                IndexOptions(batch_size=4, shard_size=8, max_bad_fraction=0.1, progress=False), DATA_OPTIONS)
    return root / "index"

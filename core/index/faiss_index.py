"""The FAISS index of an index folder: exact inner product up to a size, HNSW above it.

Embeddings are L2-normalised, so inner product is cosine similarity.

* ``flat`` (exact): ``IndexFlatIP`` for float32, ``IndexScalarQuantizer`` fp16 for float16 (exact
  on the stored fp16 values). Every query scans every vector: about 10 ms per query per 100,000
  512-d vectors on one CPU core, and no build cost.
* ``hnsw`` (approximate): ``IndexHNSWFlat`` / ``IndexHNSWSQ`` fp16 with ``M=32``,
  ``efConstruction=200``, ``efSearch=128``: query time grows with log(size); recall@10 against
  exact search is measured by ``bench/index_search.py`` (at least 0.95 is required).

``auto`` (the default) picks ``flat`` up to ``FLAT_MAX_VECTORS`` (100,000) vectors and ``hnsw`` above:
up to there an exact scan answers in tens of milliseconds and needs no extra memory; beyond,
its latency grows linearly while HNSW's stays near constant.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import atomic_write_bytes
from ..plugins import require_registered

INDEX_FILE = "index.faiss"
FLAT_MAX_VECTORS = 100_000
KINDS = ("auto", "flat", "hnsw")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("domainclip index/search/serve need faiss: pip install 'domainclip[serve]' "
                          "(or pip install faiss-cpu)") from None
    return faiss


def choose_kind(count: int, requested: str = "auto") -> str:
    """``flat`` or ``hnsw`` for ``count`` vectors (``requested`` other than ``auto`` is kept)."""
    if requested not in KINDS:
        require_registered(requested, KINDS, f"index kind {requested!r} is unknown")
    if requested != "auto":
        return requested
    return "flat" if count <= FLAT_MAX_VECTORS else "hnsw"


def new_index(kind: str, dim: int, dtype: str):
    """An empty FAISS index of ``kind`` for ``dim``-d vectors stored as ``dtype``."""
    faiss = _faiss()
    metric = faiss.METRIC_INNER_PRODUCT
    fp16 = dtype == "float16"
    if kind == "flat":
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, metric) if fp16 else faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        if fp16:
            index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, HNSW_M, metric)
        else:
            index = faiss.IndexHNSWFlat(dim, HNSW_M, metric)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        raise ValueError(f"index kind {kind!r} is unknown; valid: flat, hnsw")
    return index


def add_vectors(index, vectors: np.ndarray) -> None:
    """Append ``vectors`` (N, D) to ``index`` (float32 copies; scalar-quantised indexes are 'trained' on first use)."""
    if len(vectors) == 0:
        return
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)


def describe_index(kind: str) -> dict[str, Any]:
    """What goes into the manifest about the FAISS index."""
    info: dict[str, Any] = {"kind": kind, "flat_max_vectors": FLAT_MAX_VECTORS}
    if kind == "hnsw":
        info.update(M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, ef_search=HNSW_EF_SEARCH)
    return info


def save_index(index, folder: str | Path) -> None:
    """Write ``index.faiss`` atomically."""
    atomic_write_bytes(Path(folder) / INDEX_FILE, _faiss().serialize_index(index).tobytes())


def load_index(folder: str | Path, ef_search: int = HNSW_EF_SEARCH):
    """Read ``index.faiss`` (an HNSW index searches with ``ef_search``)."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the index was not finished; run `domainclip index` again to complete it")
    faiss = _faiss()
    index = faiss.read_index(str(path))
    hnsw = getattr(index, "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = ef_search
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of the ``k`` best vectors per query row; ids of -1 mean fewer than ``k`` exist."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

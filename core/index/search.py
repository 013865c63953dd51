"""Query an index folder: text or image -> the top k images with their metadata.

``SearchIndex.open(folder, encoder)`` refuses an encoder whose weights or preprocessing differ
from the ones the index was built with (:class:`ModelMismatchError`): their embeddings live in
different spaces and the answers would be meaningless, not merely worse. While an ``--add`` is
unfinished (running, killed, or stopped by too many bad images), the index as it was before it
is searched, with a warning.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ..data.dataset import BadImageError, open_rgb_image
from . import faiss_index
from .build import METADATA_FILE
from .encoding import Encoder
from .items import open_indexed_path
from .manifest import IndexManifest, read_manifest

log = logging.getLogger("domainclip.index")

class SearchIndex:
    """A finished index folder, loaded: FAISS index + metadata rows + the encoder that matches it."""

    def __init__(self, folder: Path, manifest: IndexManifest, index, metadata: list[dict[str, Any]],
                 encoder: Encoder):
        self.folder, self.manifest, self.index, self.rows, self.encoder = folder, manifest, index, metadata, encoder
        self._paths = {row["path"] for row in metadata}

    @classmethod
    def open(cls, folder: str | Path, encoder: Encoder | None = None, model: str = "") -> "SearchIndex":
        """Load ``folder``; the encoder is ``encoder``, else MODEL ``model``, else the model that built it."""
        folder = Path(folder)
        manifest = read_manifest(folder)
        unfinished = [s.data for s in manifest.sources if not s.complete]
        if not manifest.faiss:
            raise ValueError(f"index {folder} is not finished ({unfinished[0] if unfinished else 'no FAISS index'}); "
                             f"re-run the `domainclip index` command that was interrupted")
        if encoder is None:
            encoder = Encoder.load(model or manifest.model["source"])
        manifest.check_model(encoder.fingerprint(), folder)
        index = faiss_index.load_index(folder)
        metadata = pq.read_table(folder / METADATA_FILE).to_pylist()
        if len(metadata) != index.ntotal:
            raise ValueError(f"index {folder}: {METADATA_FILE} has {len(metadata)} rows but index.faiss "
                             f"{index.ntotal} vectors; re-run `domainclip index` to rebuild them")
        if unfinished:  # an --add that stopped (killed, or too many bad images): the index before it still serves
            log.warning("index %s: adding %s did not finish; searching the %d images indexed before it (re-run "
                        "that `domainclip index --add` to finish it)", folder, unfinished[0], index.ntotal)
        return cls(folder, manifest, index, metadata, encoder)

    def __len__(self) -> int:
        return len(self.rows)

    def search_vectors(self, queries: np.ndarray, top_k: int = 10) -> list[list[dict[str, Any]]]:
        """One hit list per query row: ``{"rank", "score", "id", "path", "captions", "label"}``, best first."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        queries = np.atleast_2d(queries)
        scores, ids = faiss_index.search(self.index, queries, min(top_k, max(len(self.rows), 1)))
        results = []
        for score_row, id_row in zip(scores, ids):
            hits = []
            for score, row_id in zip(score_row.tolist(), id_row.tolist()):
                if row_id < 0:
                    continue
                row = self.rows[row_id]
                hits.append({"rank": len(hits) + 1, "score": float(score), "id": int(row_id), "path": row["path"],
                             "captions": list(row["captions"] or []), "label": row["label"]})
            results.append(hits)
        return results

    def search_text(self, text: str, top_k: int = 10) -> list[dict[str, Any]]:
        """The ``top_k`` images closest to ``text``."""
        if not text.strip():
            raise ValueError("search text is empty")
        return self.search_vectors(self.encoder.encode_texts([text]), top_k)[0]

    def search_image(self, image: str | Path | Image.Image, top_k: int = 10) -> list[dict[str, Any]]:
        """The ``top_k`` images closest to ``image`` (a path or a decoded image)."""
        if not isinstance(image, Image.Image):
            try:
                image = open_rgb_image(image)
            except BadImageError as error:
                raise ValueError(f"query image {image}: {error.reason}") from None
        tensor = self.encoder.prepare(image).unsqueeze(0)
        return self.search_vectors(self.encoder.encode_batch(tensor), top_k)[0]

    def row(self, row_id: int) -> dict[str, Any]:
        """Metadata row ``row_id`` (``IndexError`` when out of range)."""
        if not 0 <= row_id < len(self.rows):
            raise IndexError(f"index {self.folder} has no image {row_id} (it holds {len(self.rows)})")
        return self.rows[row_id]


def plot_grid(hits: list[dict[str, Any]], out: str | Path, title: str = "", columns: int = 5) -> Path:
    """The hits' images in a grid (rank, score, label under each) saved to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not hits:
        raise ValueError("nothing to plot: the search returned no hits")
    rows = (len(hits) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, hit in zip(axes.flat, hits):
        try:
            image = open_indexed_path(hit["path"])
            image.thumbnail((256, 256))
            axis.imshow(image)
        except BadImageError as error:
            axis.text(0.5, 0.5, f"unreadable:\n{error.reason}", ha="center", va="center", fontsize=7)
        caption = f"#{hit['rank']} {hit['score']:.3f}" + (f"\n{hit['label']}" if hit["label"] else "")
        axis.set_title(caption, fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out

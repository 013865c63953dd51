"""Index and search benchmark: FAISS build memory, approximate recall, query latency, encode throughput.

Part 1 (``--vectors``, default 125,000 synthetic 512-d embeddings, clustered like real image
embeddings): build the exact (flat) and the approximate (HNSW) index through the kit's
``faiss_index`` module, streaming in chunks; peak RSS growth while building; recall@10 of HNSW
against the exact answers on held-out queries (the kit requires at least 0.95); single-query
latency p50 / p99 of both.

Part 2 (``--images``): encoding throughput of ``build_index`` (the code behind ``domainclip
index``) side by side with a plain open_clip loop (open_clip's own eval transform, a DataLoader,
``model.encode_image``) on the same open_clip model and the same image files. Both alternate
(A B B A) so a drift of the machine hits both alike.

The 1-minute load average is recorded before and after each contender; results are written to
``--json`` only when every one is at most 1.0.

``--rsicd FOLDER`` instead measures quality on real embeddings (no timing, so no load guard):
``build_index`` encodes every RSICD image (10,921) with a real model (``--quality-model``, default
the compact base); the 5,465 test captions are the queries. It reports HNSW recall@10 against
exact search, and caption -> image recall@1/5/10 (the caption's own image among all 10,921) with
the exact and with the approximate index, so the cost of approximation is stated in the unit a
user searches in.

    python bench/index_search.py --json index_search.json                    # full size (quiet machine)
    python bench/index_search.py --vectors 5000 --queries 100 --images 64    # smoke run
    python bench/index_search.py --rsicd ../shared/data/remote_sensing/rsicd --json index_quality.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import LoadLog, finish  # noqa: E402


def synthetic_embeddings(count: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (noise as long as the centre): a stand-in for image embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = centres[rng.integers(0, clusters, count)]
    vectors = vectors + rng.standard_normal((count, dim)).astype(np.float32) / np.sqrt(dim)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def build_measured(kind: str, vectors: np.ndarray, chunk: int = 10_000) -> tuple[object, dict]:
    from domainclip.core.index import faiss_index

    process = psutil.Process()
    before = process.memory_info().rss
    peak = before
    started = time.perf_counter()
    index = faiss_index.new_index(kind, vectors.shape[1], "float32")
    for start in range(0, len(vectors), chunk):
        faiss_index.add_vectors(index, vectors[start:start + chunk])
        peak = max(peak, process.memory_info().rss)
    return index, {"build_s": round(time.perf_counter() - started, 2),
                   "peak_rss_growth_mib": round((peak - before) / 2**20, 1)}


def latencies(index, queries: np.ndarray, k: int) -> dict:
    from domainclip.core.index import faiss_index

    times = []
    for query in queries:
        started = time.perf_counter()
        faiss_index.search(index, query[None], k)
        times.append(time.perf_counter() - started)
    times_ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(times_ms, 50)), 3), "p99_ms": round(float(np.percentile(times_ms, 99)), 3)}


def part_vectors(args: argparse.Namespace, load: LoadLog) -> dict:
    from domainclip.core.index import faiss_index

    data = synthetic_embeddings(args.vectors + args.queries, args.dim, args.clusters, seed=0)
    base, queries = data[:args.vectors], data[args.vectors:]
    results = {"vectors": args.vectors, "dim": args.dim, "queries": len(queries)}
    answers = {}
    for kind in ("flat", "hnsw"):
        with load.around(kind, 0):
            index, build = build_measured(kind, base)
            _, ids = faiss_index.search(index, queries, 10)
            answers[kind] = ids
            results[kind] = {**build, **latencies(index, queries, 10)}
        del index
    hits = [len(set(a) & set(e)) / 10 for a, e in zip(answers["hnsw"], answers["flat"])]
    results["hnsw_recall_at_10"] = round(float(np.mean(hits)), 4)
    results["hnsw_recall_ok"] = results["hnsw_recall_at_10"] >= 0.95
    results["latency_ratio_flat_over_hnsw_p50"] = round(results["flat"]["p50_ms"] / results["hnsw"]["p50_ms"], 2)
    return results


def write_images(folder: Path, count: int, size: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")
    return folder


def plain_open_clip_loop(model, image_size: int, files: list[Path], batch_size: int, workers: int) -> int:
    """The peer: open_clip's eval transform + a DataLoader + ``encode_image``, nothing else."""
    import open_clip
    import torch
    from PIL import Image

    transform = open_clip.image_transform(image_size, is_train=False)

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return transform(Image.open(files[i]).convert("RGB"))

    count = 0
    loader = torch.utils.data.DataLoader(Files(), batch_size=batch_size, num_workers=workers)
    with torch.inference_mode():
        for batch in loader:
            model.encode_image(batch, normalize=True)
            count += len(batch)
    return count


def part_encode(args: argparse.Namespace, load: LoadLog) -> dict:
    from domainclip.core.index import Encoder, IndexOptions, build_index

    encoder = Encoder.load(args.model, device="cpu")
    peer_model = encoder.classifier.model.model  # the same open_clip module the kit wraps
    size = encoder.classifier.preprocess.image_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.image_folder) if args.image_folder else write_images(Path(tmp) / "images", args.images, 256)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.images]
        runs = {"index": [], "open_clip": []}
        for round_number, name in enumerate(("index", "open_clip", "open_clip", "index")):
            with load.around(f"encode:{name}", round_number):
                started = time.perf_counter()
                if name == "index":
                    summary = build_index(encoder, str(folder), Path(tmp) / f"index{round_number}",
                                          IndexOptions(batch_size=args.batch_size, shard_size=args.batch_size * 64,
                                                       workers=args.workers, progress=False, max_bad_fraction=1.0))
                    count = summary["count"]
                else:
                    count = plain_open_clip_loop(peer_model, size, files, args.batch_size, args.workers)
                runs[name].append(count / (time.perf_counter() - started))
    index_rate, peer_rate = float(np.mean(runs["index"])), float(np.mean(runs["open_clip"]))
    return {"model": args.model, "images": len(files), "batch_size": args.batch_size, "workers": args.workers,
            "index_images_per_s": round(index_rate, 2), "open_clip_images_per_s": round(peer_rate, 2),
            "ratio_index_over_open_clip": round(index_rate / peer_rate, 3),
            "note": "index time includes writing shards, metadata and the FAISS index"}


def rsicd_test_captions(folder: Path) -> tuple[list[str], list[str]]:
    """RSICD's Karpathy-style split file: (caption, file name of its image) for every test caption."""
    images = json.loads((folder / "dataset_rsicd.json").read_text())["images"]
    pairs = [(sentence["raw"], image["filename"]) for image in images if image["split"] == "test"
             for sentence in image["sentences"]]
    return [caption for caption, _ in pairs], [name for _, name in pairs]


def part_quality(args: argparse.Namespace) -> dict:
    """Approximate search on real embeddings: recall@10 against exact, and what it costs in retrieval."""
    from domainclip.core.index import Encoder, IndexOptions, build_index, faiss_index
    from domainclip.core.index.manifest import read_manifest
    from domainclip.core.index.shards import read_shard

    folder = Path(args.rsicd)
    encoder = Encoder.load(args.quality_model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "index"
        summary = build_index(encoder, str(folder / "RSICD_images"), out,
                              IndexOptions(batch_size=args.batch_size, workers=args.workers, kind="flat", progress=False))
        shards = [read_shard(out, n) for n in range(sum(s.num_shards for s in read_manifest(out).sources))]
    gallery = np.concatenate([shard.embeddings for shard in shards]).astype(np.float32)
    names = [Path(p).name for shard in shards for p in shard.metadata.column("path").to_pylist()]
    captions, targets = rsicd_test_captions(folder)
    row_of = {name: row for row, name in enumerate(names)}
    missing = sorted({t for t in targets if t not in row_of})
    if missing:
        raise ValueError(f"{len(missing)} test images are not in the index (first: {missing[0]}); see its bad inputs")
    queries = encoder.encode_texts(captions).astype(np.float32)
    truth = np.array([row_of[t] for t in targets])
    results = {"model": args.quality_model, "gallery_images": len(gallery), "dim": int(gallery.shape[1]),
               "queries": len(queries), "index_summary": {k: v for k, v in summary.items() if k not in ("bad", "index")}}
    answers = {}
    for kind in ("flat", "hnsw"):
        index = faiss_index.new_index(kind, gallery.shape[1], "float32")
        faiss_index.add_vectors(index, gallery)
        _, answers[kind] = faiss_index.search(index, queries, 10)
        results[f"{kind}_caption_to_image_recall"] = {
            f"R@{k}": round(float(np.mean([t in row[:k] for t, row in zip(truth, answers[kind])])), 4) for k in (1, 5, 10)}
    hits = [len(set(a) & set(e)) / 10 for a, e in zip(answers["hnsw"], answers["flat"])]
    results["hnsw_recall_at_10"] = round(float(np.mean(hits)), 4)
    results["hnsw_recall_ok"] = results["hnsw_recall_at_10"] >= 0.95
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=125_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--images", type=int, default=512, help="images for the encode comparison (0 = skip it)")
    parser.add_argument("--image-folder", default="", help="real images instead of generated ones (e.g. RSICD_images)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random init unless a folder)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rsicd", default="", help="RSICD folder: only the real-embedding quality part (no timing)")
    parser.add_argument("--quality-model", default="compact_base", help="MODEL of `domainclip index` for --rsicd")
    parser.add_argument("--json", default="", help="write the results here (only when the machine was quiet)")
    args = parser.parse_args()
    if args.rsicd:
        results = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "quality": part_quality(args)}
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    load = LoadLog()
    results = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "search": part_vectors(args, load)}
    if args.images:
        results["encode"] = part_encode(args, load)
    return finish(results, load, args.json)


if __name__ == "__main__":
    sys.exit(main())

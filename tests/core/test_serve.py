"""domainclip serve: endpoints against the encoder's own answers, limits answered 4xx, micro-batching, SIGTERM."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from domainclip.core.index import SearchIndex
from domainclip.core.serve import Limits, MicroBatcher, ServeSettings, create_app

from .index_fixtures import png_bytes

REPO = Path(__file__).resolve().parents[2]
RED, GREEN = (220, 20, 20), (20, 220, 20)
LIMITS = Limits(max_pixels=1_000_000, max_labels=5, max_body_bytes=300_000, max_image_bytes=200_000)


@pytest.fixture(scope="module")
def client(compact_encoder, colour_index):
    app = create_app(compact_encoder, SearchIndex.open(colour_index, compact_encoder),
                     ServeSettings(max_batch=4, max_wait_ms=20, limits=LIMITS))
    with TestClient(app) as test_client:
        yield test_client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_classify_hf_payload_matches_the_classifier(client, compact_encoder) -> None:
    labels = ["red", "green", "blue"]
    answer = client.post("/classify", json={"inputs": b64(png_bytes(RED)),
                                            "parameters": {"candidate_labels": labels}})
    assert answer.status_code == 200, answer.text
    results = answer.json()
    assert [r["label"] for r in results][0] == "red" and sorted(r["label"] for r in results) == sorted(labels)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    expected = compact_encoder.classifier.predict_proba([Image.open(io.BytesIO(png_bytes(RED)))], labels)[0]
    got = {r["label"]: r["score"] for r in results}
    np.testing.assert_allclose([got[label] for label in labels], expected.numpy(), atol=1e-5)
    # multipart upload with a hypothesis template: the template's own classifier
    answer = client.post("/classify", files={"inputs": ("leaf.png", png_bytes(GREEN), "image/png")},
                         data={"candidate_labels": "red, green", "hypothesis_template": "a {} square."})
    assert answer.status_code == 200, answer.text
    expected = compact_encoder.classifier.predict_proba([Image.open(io.BytesIO(png_bytes(GREEN)))], ["red", "green"],
                                                        ["a {} square."])[0]
    got = {r["label"]: r["score"] for r in answer.json()}
    np.testing.assert_allclose([got["red"], got["green"]], expected.numpy(), atol=1e-5)


def test_embed_and_search_and_thumbnails(client, compact_encoder) -> None:
    texts = client.post("/embed", json={"texts": ["a red square", "a blue square"]}).json()
    assert texts["dim"] == 384 and texts["model_sha256"] == compact_encoder.fingerprint()["sha256"]
    np.testing.assert_allclose(texts["embeddings"], compact_encoder.encode_texts(["a red square", "a blue square"]),
                               atol=1e-5)
    images = client.post("/embed", json={"images": [b64(png_bytes(RED)), b64(png_bytes(GREEN))]}).json()
    reference = compact_encoder.encode_batch(torch.stack([compact_encoder.prepare(Image.open(io.BytesIO(png_bytes(c))).convert("RGB"))
                                                          for c in (RED, GREEN)]))
    np.testing.assert_allclose(images["embeddings"], reference, atol=1e-5)
    hits = client.post("/search", json={"text": "a green square", "top_k": 3}).json()["hits"]
    assert [hit["label"] for hit in hits] == ["green"] * 3 and hits[0]["thumbnail"] == f"/thumbnail/{hits[0]['id']}"
    by_image = client.post("/search", files={"image": ("q.png", png_bytes(RED), "image/png")}, data={"top_k": "2"})
    assert [hit["label"] for hit in by_image.json()["hits"]] == ["red", "red"]
    for top_k in (2.9, "2.9", True, "two"):  # never silently rounded down
        refused = client.post("/search", json={"text": "a green square", "top_k": top_k})
        assert refused.status_code == 422 and "top_k: expected an integer" in refused.json()["error"], top_k
    thumb = client.get(hits[0]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (40, 40)
    assert client.get("/thumbnail/20").status_code == 404  # 20 images: ids 0..19
    assert client.get("/thumbnail/abc").status_code == 422  # only ids of indexed images, never paths
    traversal = client.get("/thumbnail/..%2F..%2Fetc%2Fpasswd")
    assert traversal.status_code in (404, 422) and b"root:" not in traversal.content
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["index"] == {"count": 20} and health["batching"]["max_batch"] == 4
    assert "/classify" in client.get("/openapi.json").json()["paths"] and client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="classify-button"' in page.text and 'id="search-button"' in page.text


def _bomb(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 0).save(buffer, format="PNG")  # compresses to a few kilobytes
    return buffer.getvalue()


@pytest.mark.parametrize("kwargs, status, message", [
    ({"json": {"inputs": b64(b"GIF89a not really"), "parameters": {"candidate_labels": ["a"]}}}, 415, "not an image"),
    ({"json": {"inputs": b64(_bomb(1200)), "parameters": {"candidate_labels": ["a"]}}}, 413, "1440000 pixels"),
    ({"json": {"inputs": b64(png_bytes(RED)), "parameters": {"candidate_labels": list("abcdef")}}}, 413,
     "6 given, more than the limit of 5"),
    ({"json": {"inputs": b64(png_bytes(RED)), "parameters": {}}}, 422, "candidate_labels: missing"),
    ({"json": {"inputs": "@@@", "parameters": {"candidate_labels": ["a"]}}}, 422, "not valid base64"),
    ({"json": {"inputs": b64(png_bytes(RED)), "parameters": {"candidate_labels": ["a", "a"]}}}, 422, "repeated"),
    ({"json": {"inputs": b64(png_bytes(RED)), "parameters": {"candidate_labels": ["a"],
                                                             "hypothesis_template": "no slot"}}}, 422, "one {}"),
    ({"json": {"inputs": b64(png_bytes(RED)), "parameters": {"candidate_labels": ["a"],
                                                             "hypothesis_template": "{} " + "x" * 300}}},
     413, "hypothesis_template: 303 characters, more than the limit of 300"),
    ({"content": b'{"inputs": ', "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
    ({"content": json.dumps({"inputs": "A" * 400_000}).encode(), "headers": {"content-type": "application/json"}},
     413, "request body is larger than the limit of 300000"),
    ({"files": {"inputs": ("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png")}, "data": {"candidate_labels": "a"}},
     415, "inputs"),
])
def test_bad_requests_get_clear_4xx_and_the_service_lives_on(client, kwargs, status, message) -> None:
    answer = client.post("/classify", **kwargs)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]
    good = client.post("/classify", json={"inputs": b64(png_bytes(RED)), "parameters": {"candidate_labels": ["red", "blue"]}})
    assert good.status_code == 200 and good.json()[0]["label"] == "red"


def test_search_without_index_is_404(compact_encoder) -> None:
    with TestClient(create_app(compact_encoder, None, ServeSettings(max_batch=1))) as plain:
        answer = plain.post("/search", json={"text": "red"})
        assert answer.status_code == 404 and "--index" in answer.json()["error"]
        assert plain.get("/health").json()["index"] is None


def test_micro_batcher_groups_concurrent_requests_and_survives_errors() -> None:
    sizes = []

    def encode(batch: torch.Tensor) -> np.ndarray:
        sizes.append(len(batch))
        if (batch < 0).any():
            raise ValueError("negative input")
        time.sleep(0.01)
        return batch.flatten(1).sum(dim=1, keepdim=True).numpy()

    batcher = MicroBatcher(encode, max_batch=4, max_wait_ms=200)
    futures = {}
    threads = [threading.Thread(target=lambda i=i: futures.__setitem__(i, batcher.submit([torch.full((1, 2, 2), float(i))])[0]))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [float(futures[i].result(timeout=5)[0]) for i in range(8)] == [4.0 * i for i in range(8)]
    assert max(sizes) == 4 and sum(sizes) == 8 and len(sizes) <= 3
    failing = batcher.submit([torch.full((1, 2, 2), -1.0)])[0]
    with pytest.raises(ValueError, match="negative input"):
        failing.result(timeout=5)
    assert float(batcher.submit([torch.ones(1, 2, 2)])[0].result(timeout=5)[0]) == 4.0
    batcher.close()
    unbatched = MicroBatcher(encode, max_batch=1, max_wait_ms=0)
    sizes.clear()
    results = [f.result(timeout=5) for f in unbatched.submit([torch.ones(1, 2, 2)] * 3)]
    assert sizes == [1, 1, 1] and len(results) == 3
    unbatched.close()


def test_a_cancelled_request_never_stops_the_batcher() -> None:
    started, release = threading.Event(), threading.Event()

    def encode(batch: torch.Tensor) -> np.ndarray:
        started.set()
        release.wait(5)
        return batch.flatten(1).sum(dim=1, keepdim=True).numpy()

    batcher = MicroBatcher(encode, max_batch=4, max_wait_ms=0)
    busy = batcher.submit([torch.ones(1, 2, 2)])[0]  # holds the thread in encode
    assert started.wait(5)
    queued = batcher.submit([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), 3.0)])
    assert queued[0].cancel()  # its client went away while it waited
    release.set()
    assert float(busy.result(timeout=5)[0]) == 4.0 and float(queued[1].result(timeout=5)[0]) == 12.0
    assert batcher.alive and batcher.items == 2  # the cancelled image was not encoded
    # model work other than images runs in the same thread, between batches, errors included
    assert batcher.call(threading.current_thread).result(timeout=5).name == "micro-batcher"
    with pytest.raises(ZeroDivisionError):
        batcher.call(lambda: 1 / 0).result(timeout=5)
    assert float(batcher.submit([torch.ones(1, 2, 2)])[0].result(timeout=5)[0]) == 4.0
    batcher.close()
    assert not batcher.alive
    with pytest.raises(RuntimeError, match="the micro-batcher is stopped"):
        batcher.call(print)


def test_a_client_that_leaves_while_its_images_wait_is_never_encoded(compact_encoder, monkeypatch) -> None:
    import asyncio

    started, release, encoded = threading.Event(), threading.Event(), []
    encode_batch = compact_encoder.encode_batch

    def slow(images: torch.Tensor) -> np.ndarray:  # the first request holds the model until released
        encoded.append(len(images))
        started.set()
        release.wait(10)
        return encode_batch(images)

    monkeypatch.setattr(compact_encoder, "encode_batch", slow)
    app = create_app(compact_encoder, None, ServeSettings(max_batch=1, max_wait_ms=0, limits=LIMITS))
    body = json.dumps({"images": [b64(png_bytes(RED))]}).encode()
    scope = {"type": "http", "method": "POST", "path": "/embed", "query_string": b"", "http_version": "1.1",
             "scheme": "http", "server": ("test", 80), "client": ("client", 1), "root_path": "",
             "asgi": {"version": "3.0"},
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def scenario() -> tuple[int, list[int]]:
        busy = asyncio.ensure_future(asgi_post(app, scope, body))
        assert await asyncio.to_thread(started.wait, 10)
        gone = await asyncio.wait_for(asyncio.gather(*(asgi_post(app, scope, body, leaves=True) for _ in range(2))), 10)
        release.set()
        return await asyncio.wait_for(busy, 10), list(gone)

    try:
        assert asyncio.run(scenario()) == (200, [499, 499])
        assert encoded == [1]  # the two queued images of the clients that left were skipped
        assert asyncio.run(asgi_post(app, scope, body)) == 200 and encoded == [1, 1]  # the batcher goes on
    finally:
        app.state.service.batcher.close()


async def asgi_post(app, scope: dict, body: bytes, leaves: bool = False) -> int:
    """``body`` posted straight to the ASGI ``app``; the client disconnects after sending it when
    ``leaves``, else stays connected. Returns the response status."""
    import asyncio

    sent, delivered = [], []

    async def receive() -> dict:
        if not delivered:
            delivered.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        if leaves:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # still connected: nothing more arrives
        return {}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(dict(scope), receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_decoding_off_the_event_loop_and_text_on_the_model_thread(compact_encoder, monkeypatch) -> None:
    import asyncio

    from domainclip.core.serve import app as app_module

    where: dict[str, set] = {"decode": set(), "text": set()}

    def in_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    decode, encode_texts = app_module.decode_image, compact_encoder.encode_texts
    monkeypatch.setattr(app_module, "decode_image", lambda *a: (where["decode"].add(in_loop()), decode(*a))[1])
    monkeypatch.setattr(compact_encoder, "encode_texts",
                        lambda texts: (where["text"].add(threading.current_thread().name), encode_texts(texts))[1])
    with TestClient(create_app(compact_encoder, None, ServeSettings(max_batch=2, limits=LIMITS))) as plain:
        assert plain.post("/embed", json={"images": [b64(png_bytes(RED))]}).status_code == 200
        assert plain.post("/embed", json={"texts": ["red"]}).status_code == 200
        answer = plain.post("/classify", json={"inputs": b64(png_bytes(RED)), "parameters": {"candidate_labels": ["r", "g"]}})
        assert answer.status_code == 200
        assert where == {"decode": {False}, "text": {"micro-batcher"}}
        too_many = plain.post("/embed", files=[("images", (f"{i}.png", png_bytes(RED), "image/png")) for i in range(17)])
        assert too_many.status_code == 413 and "more images than the limit of 16" in too_many.json()["error"]
        service = plain.app.state.service
        service.batcher.close()
        stopped = plain.get("/health")
        assert stopped.status_code == 503 and stopped.json()["status"] == "stopped"


def test_the_label_heads_cache_keeps_the_most_recent(compact_encoder) -> None:
    classifier = compact_encoder.classifier
    classifier.clear_cache(weights=False)
    image = [Image.open(io.BytesIO(png_bytes(RED)))]
    try:
        classifier.max_cached_heads = 3
        for index in range(5):
            classifier.predict_proba(image, [f"red {index}", "green"])
        assert [key[0][0] for key in classifier._heads] == ["red 2", "red 3", "red 4"]
        classifier.predict_proba(image, ["red 2", "green"])  # a hit moves it to the end
        classifier.predict_proba(image, ["red 5", "green"])
        assert [key[0][0] for key in classifier._heads] == ["red 4", "red 2", "red 5"]
    finally:
        del classifier.max_cached_heads
        classifier.clear_cache(weights=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_serve_command_answers_and_stops_cleanly_on_sigterm(colour_index) -> None:
    port = _free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "domainclip.core.cli", "serve", "compact_base", "--index",
                                str(colour_index), "--port", str(port)], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        health = None
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    health = json.load(response)
                break
            except OSError:
                if process.poll() is not None:
                    break
                time.sleep(0.5)
        assert health is not None and health["index"] == {"count": 20}, process.stderr.read() if process.poll() else ""
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "Finished server process" in stderr

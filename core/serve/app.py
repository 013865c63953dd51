"""The HTTP service: FastAPI app with /classify, /embed, /search, /thumbnail, /health and the page at /.

``POST /classify`` speaks Hugging Face's zero-shot-image-classification payload: JSON
``{"inputs": "<base64 image>", "parameters": {"candidate_labels": [...], "hypothesis_template":
"a photo of a {}."}}`` or a multipart upload (file field ``inputs``, form fields
``candidate_labels`` comma-separated and ``hypothesis_template``), and answers
``[{"label", "score"}]``, most probable first. Bodies are parsed by hand (so one endpoint takes
both encodings); their schemas are still published in the OpenAPI document at /docs.
"""
from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from ..data.dataset import BadImageError
from ..index.encoding import Encoder
from ..index.items import open_indexed_path
from ..index.search import SearchIndex
from .batcher import MicroBatcher
from .limits import Limits, RequestError, check_strings, decode_base64, decode_image
from .page import PAGE_HTML

THUMBNAIL_SIZE = 256
DISCONNECT_POLL_S = 0.05  # how often a waiting request checks that its client is still there


class ClientGone(Exception):
    """The client disconnected before its answer was ready (answered 499, which nobody reads)."""


@dataclass
class ServeSettings:
    """Service settings: micro-batching (``max_batch=1`` = off), device, request limits."""

    max_batch: int = 16
    max_wait_ms: float = 5.0
    device: str | None = None
    limits: Limits = field(default_factory=Limits)


class BodyLimitMiddleware:
    """Refuses (413) a request body above ``max_bytes`` before the app sees it, chunked uploads included."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(scope, receive, send, self.max_bytes)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _too_large(scope, receive, send, self.max_bytes)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _too_large(scope, receive, send, limit: int) -> None:
    response = JSONResponse({"error": f"request body is larger than the limit of {limit} bytes"}, status_code=413)
    await response(scope, receive, send)


def _body_schema(properties: dict[str, Any], multipart: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"content": {
        "application/json": {"schema": {"type": "object", "properties": properties}},
        "multipart/form-data": {"schema": {"type": "object", "properties": multipart}}}}}


IMAGE_B64 = {"type": "string", "description": "base64-encoded image (or a data: URL)"}
FILE = {"type": "string", "format": "binary"}
CLASSIFY_SCHEMA = _body_schema(
    {"inputs": IMAGE_B64, "parameters": {"type": "object", "properties": {
        "candidate_labels": {"type": "array", "items": {"type": "string"}},
        "hypothesis_template": {"type": "string", "example": "a photo of a {}."}}}},
    {"inputs": FILE, "candidate_labels": {"type": "string", "description": "comma-separated"},
     "hypothesis_template": {"type": "string"}})
EMBED_SCHEMA = _body_schema({"images": {"type": "array", "items": IMAGE_B64},
                             "texts": {"type": "array", "items": {"type": "string"}}},
                            {"images": {"type": "array", "items": FILE}})
SEARCH_SCHEMA = _body_schema({"text": {"type": "string"}, "image": IMAGE_B64, "top_k": {"type": "integer"}},
                             {"image": FILE, "text": {"type": "string"}, "top_k": {"type": "integer"}})


class Service:
    """What the endpoints share: the encoder, the micro-batcher, the optional index, the limits."""

    def __init__(self, encoder: Encoder, index: SearchIndex | None, settings: ServeSettings):
        self.encoder, self.index, self.settings, self.limits = encoder, index, settings, settings.limits
        encoder.fingerprint()  # computed (a text forward pass) now, never on the event loop beside the batcher
        self.batcher = MicroBatcher(encoder.encode_batch, settings.max_batch, settings.max_wait_ms)

    async def payload(self, request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
        """``(fields, files)`` of a JSON or multipart body (files only from multipart)."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            try:
                form = await request.form(max_files=self.limits.max_images, max_fields=50,
                                          max_part_size=self.limits.max_body_bytes)
            except Exception as error:  # starlette's MultiPartException and malformed bodies
                if "Too many files" in str(error):
                    raise RequestError(413, f"more images than the limit of {self.limits.max_images}") from None
                raise RequestError(400, f"malformed multipart body: {error}") from None
            fields: dict[str, Any] = {}
            files: dict[str, list[bytes]] = {}
            for key, value in form.multi_items():
                if isinstance(value, str):
                    fields[key] = value
                else:
                    files.setdefault(key, []).append(await value.read())
            return fields, files
        body = await request.body()
        try:
            fields = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(400, f"body is not valid JSON: {error}") from None
        if not isinstance(fields, dict):
            raise RequestError(422, "body must be a JSON object")
        return fields, {}

    async def embed_images(self, images: list[Image.Image], request: Request | None = None) -> np.ndarray:
        """Decoded images -> (N, D) embeddings through the micro-batcher.

        With ``request``, a client that disconnects while its images wait cancels them (the batcher
        skips cancelled images) and :class:`ClientGone` is raised: nobody is left to answer.
        """
        tensors = [await anyio.to_thread.run_sync(self.encoder.prepare, image) for image in images]
        futures = self.batcher.submit(tensors)
        waiting = asyncio.ensure_future(asyncio.gather(*(asyncio.wrap_future(future) for future in futures)))
        while request is not None and not waiting.done():
            await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
            if not waiting.done() and await request.is_disconnected():
                waiting.cancel()
                for future in futures:
                    future.cancel()
                raise ClientGone()
        return np.stack(await waiting)

    async def on_model_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` (a text encoding, a label head) in the batcher's thread, between image batches."""
        return await asyncio.wrap_future(self.batcher.call(fn, *args))

    async def images(self, fields: dict[str, Any], files: dict[str, list[bytes]], names: tuple[str, ...],
                     many: bool) -> list[Image.Image]:
        """:meth:`images_from` in a worker thread: decoding never blocks the event loop."""
        return await anyio.to_thread.run_sync(self.images_from, fields, files, names, many)

    def images_from(self, fields: dict[str, Any], files: dict[str, list[bytes]], names: tuple[str, ...],
                    many: bool) -> list[Image.Image]:
        """The images of a request: uploaded files under any of ``names``, else base64 strings in those fields."""
        for name in names:
            if name in files:
                blobs = [(f"{name}[{i}]", data) for i, data in enumerate(files[name])]
                break
            if name in fields:
                value = fields[name]
                values = value if (many and isinstance(value, list)) else [value]
                blobs = [(f"{name}[{i}]" if many else name, decode_base64(v, name, self.limits))
                         for i, v in enumerate(values)]
                break
        else:
            return []
        if len(blobs) > self.limits.max_images:
            raise RequestError(413, f"{len(blobs)} images, more than the limit of {self.limits.max_images}")
        return [decode_image(data, label, self.limits) for label, data in blobs]


def create_app(encoder: Encoder, index: SearchIndex | None = None, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``encoder`` (and ``index`` for /search and /thumbnail)."""
    settings = settings or ServeSettings()
    service = Service(encoder, index, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        service.batcher.close()

    app = FastAPI(title="domainclip", description="Zero-shot classification, embeddings and image search",
                  lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def refused(_request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"error": error.message}, status_code=error.status)

    @app.exception_handler(ClientGone)
    async def gone(_request: Request, _error: ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(ValueError)
    async def invalid(_request: Request, error: ValueError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}"}, status_code=500)


def _add_routes(app: FastAPI, service: Service) -> None:
    limits = service.limits

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE_HTML

    @app.get("/health", response_model=None)
    async def health() -> dict[str, Any] | JSONResponse:
        """Liveness (503 when the model thread has stopped) and what is served: model pin, index size,
        batching counters."""
        fingerprint = service.encoder.fingerprint()
        body = {"status": "ok" if service.batcher.alive else "stopped", "model": {"source": fingerprint["source"], "sha256": fingerprint["sha256"],
                                          "embed_dim": fingerprint["embed_dim"]},
                "index": {"count": len(service.index)} if service.index is not None else None,
                "batching": {"max_batch": service.batcher.max_batch, "max_wait_ms": service.settings.max_wait_ms,
                             "batches": service.batcher.batches, "images": service.batcher.items}}
        return body if service.batcher.alive else JSONResponse(body, status_code=503)

    @app.post("/classify", openapi_extra=CLASSIFY_SCHEMA)
    async def classify(request: Request) -> list[dict[str, Any]]:
        """Zero-shot classification of one image (Hugging Face zero-shot-image-classification payload)."""
        fields, files = await service.payload(request)
        parameters = fields.get("parameters", {})
        if isinstance(parameters, str):
            try:
                parameters = json.loads(parameters)
            except json.JSONDecodeError:
                raise RequestError(422, "parameters: a multipart 'parameters' field must be a JSON object") from None
        if not isinstance(parameters, dict):
            raise RequestError(422, "parameters: expected an object")
        parameters = {**{k: fields[k] for k in ("candidate_labels", "hypothesis_template") if k in fields}, **parameters}
        if "candidate_labels" not in parameters:
            raise RequestError(422, "parameters.candidate_labels: missing; give the class names to choose from")
        labels = check_strings(parameters["candidate_labels"], "candidate_labels", limits.max_labels, limits)
        template = parameters.get("hypothesis_template")
        if template is not None:
            if not isinstance(template, str) or "{}" not in template:
                raise RequestError(422, "parameters.hypothesis_template: expected a string with one {} for the label")
            if len(template) > limits.max_label_chars:
                raise RequestError(413, f"parameters.hypothesis_template: {len(template)} characters, more than the "
                                        f"limit of {limits.max_label_chars}")
        images = await service.images(fields, files, ("inputs", "image", "file"), many=False)
        if len(images) != 1:
            raise RequestError(422, "inputs: give exactly one image (base64 in JSON, or a multipart file 'inputs')")
        embeddings = await service.embed_images(images, request)
        templates = [template] if template else None
        probabilities = await service.on_model_thread(service.encoder.probabilities, embeddings, labels, templates)
        order = np.argsort(-probabilities[0], kind="stable")
        return [{"label": labels[j], "score": float(probabilities[0][j])} for j in order]

    @app.post("/embed", openapi_extra=EMBED_SCHEMA)
    async def embed(request: Request) -> dict[str, Any]:
        """L2-normalised embeddings of images (base64 list or multipart files) or of texts."""
        fields, files = await service.payload(request)
        images = await service.images(fields, files, ("images", "inputs"), many=True)
        texts = fields.get("texts")
        if bool(images) == (texts is not None):
            raise RequestError(422, "give either 'images' (base64 list or files) or 'texts', not both or neither")
        if images:
            vectors = await service.embed_images(images, request)
        else:
            texts = check_strings(texts if isinstance(texts, list) else [texts], "texts", limits.max_texts, limits)
            vectors = await service.on_model_thread(service.encoder.encode_texts, texts)
        return {"embeddings": vectors.tolist(), "dim": int(vectors.shape[1]),
                "model_sha256": service.encoder.fingerprint()["sha256"]}

    @app.post("/search", openapi_extra=SEARCH_SCHEMA)
    async def search(request: Request) -> dict[str, Any]:
        """Top-k images of the index for a text or an image, with their metadata and thumbnail URLs."""
        if service.index is None:
            raise RequestError(404, "no index is loaded: start the service with --index INDEX")
        fields, files = await service.payload(request)
        raw_top_k = fields.get("top_k", 10)
        try:  # an int, or its digits (multipart fields are strings); 2.9 is not silently 2
            top_k = raw_top_k if isinstance(raw_top_k, int) and not isinstance(raw_top_k, bool) else int(str(raw_top_k))
        except ValueError:
            raise RequestError(422, f"top_k: expected an integer, got {raw_top_k!r}") from None
        if not 1 <= top_k <= limits.max_top_k:
            raise RequestError(422, f"top_k: must be between 1 and {limits.max_top_k}, got {top_k}")
        images = await service.images(fields, files, ("image",), many=False)
        text = fields.get("text")
        if bool(images) == (text is not None):
            raise RequestError(422, "give either 'text' or 'image', not both or neither")
        if images:
            query = await service.embed_images(images, request)
        else:
            text = check_strings([text] if isinstance(text, str) else text, "text", 1, limits)[0]
            query = await service.on_model_thread(service.encoder.encode_texts, [text])
        hits = (await anyio.to_thread.run_sync(service.index.search_vectors, query, top_k))[0]  # off the event loop
        return {"hits": [{**hit, "thumbnail": f"/thumbnail/{hit['id']}"} for hit in hits]}

    @app.get("/thumbnail/{image_id}", responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(image_id: int) -> Response:
        """A JPEG thumbnail of indexed image ``image_id`` (only images listed in the index are served)."""
        if service.index is None:
            raise RequestError(404, "no index is loaded: start the service with --index INDEX")
        try:
            path = service.index.row(image_id)["path"]
        except IndexError as error:
            raise RequestError(404, str(error)) from None
        data = await anyio.to_thread.run_sync(_thumbnail_bytes, path)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def _thumbnail_bytes(path: str) -> bytes:
    try:
        image = open_indexed_path(path)
    except BadImageError as error:
        raise RequestError(410, f"indexed image is no longer readable: {error.reason}") from None
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()

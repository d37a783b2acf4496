"""The HTTP side of `resnetkit serve`: LitServe's FastAPI app given the routes it lacks (the
page, /metadata, /metrics, a POST /predict that takes raw image bytes or a multipart file and
checks them before queueing), a bounded queue, and errors as {"error": sentence}."""
from __future__ import annotations

import asyncio
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .batcher import Batcher
from .decode import IMAGE_TYPES, BadInput, check_type, decode_image
from .metrics import exposition, http_metrics

DECODE_IN_THREAD = 64 << 10  # bodies above this are decoded off the event loop


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    too_big = BadInput(413, f"the upload is over the server's limit of {limit / 2**20:g} MB "
                            f"(--max-body-mb)")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def file_from_form(request, body: bytes) -> bytes:
    """The first file field of a multipart body."""
    from starlette.datastructures import UploadFile

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}
    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except Exception as e:  # the multipart parser's own exception types
        raise BadInput(400, f"the multipart body cannot be read ({e})") from None
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not files:
        raise BadInput(400, "the multipart body has no file field: send the image as "
                            "a file field (curl -F file=@image.png)")
    return await files[0].read()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def busy_message(limits: dict[str, Any]) -> str:
    return (f"the server is at its queue limit of {limits['max_queue']} requests "
            f"(--max-queue); retry shortly")


class FastPaths:
    """ASGI middleware in front of everything: /health, and the 503 of a full queue, are
    answered here without FastAPI's routing, body reading or decoding. Under 2x overload of
    a small model the HTTP process is the bottleneck, and there the cost of each refusal
    and each health check decides how long /health waits. /health is 200 once every worker
    has loaded its model (LitServe's own makes a round trip to its manager process on every
    call)."""

    def __init__(self, app, pending: list[int], limits: dict[str, Any], state_dir: Path):
        self.app, self.pending, self.limits, self.state_dir = app, pending, limits, state_dir
        self.ready = False
        self.busy = json.dumps({"error": busy_message(limits)}).encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/health" and scope["method"] == "GET":
                if not self.ready:
                    found = len(list(self.state_dir.glob("worker-*.json")))
                    self.ready = found >= self.limits["workers"]
                return await self._send(send, 200 if self.ready else 503,
                                        b"ok" if self.ready else b"not ready", b"text/plain")
            if path == "/predict" and self.pending[0] >= self.limits["max_queue"]:
                m = http_metrics()
                m.requests.labels("503").inc()
                m.errors.labels("overloaded").inc()
                return await self._send(send, 503, self.busy, b"application/json",
                                        [(b"retry-after", b"1")])
        await self.app(scope, receive, send)

    @staticmethod
    async def _send(send, status: int, body: bytes, kind: bytes, extra=()) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", kind), (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})


def add_routes(server, api, info: dict[str, Any], meta: dict[str, Any], limits: dict[str, Any],
               state_dir: Path) -> None:
    """Replace LitServe's / and POST /predict with ours; add /metadata and /metrics; errors
    as {"error": sentence}."""
    from litserve.server import RegularRequestHandler

    app = server.app
    app.router.routes[:] = [r for r in app.router.routes
                            if getattr(r, "path", None) not in ("/", "/predict", "/health")]
    handler = RegularRequestHandler(api, server)
    batcher: list[Batcher] = []  # made in the HTTP process, on its event loop

    async def run_one(image, top_k: int) -> dict[str, Any]:
        if limits["batching"] == "litserve":
            return await handler.handle_request({"image": image, "top_k": top_k}, dict)
        if not batcher:
            batcher.append(Batcher(lambda payload: handler.handle_request(payload, dict),
                                   limits["max_batch"], limits["batch_timeout_ms"] / 1000,
                                   limits["workers"]))
        return await batcher[0](image, top_k)

    pending = [0]  # accepted /predict requests not yet answered, in this HTTP process
    app.add_middleware(FastPaths, pending=pending, limits=limits, state_dir=state_dir)
    page = resources.files("resnetkit.serve").joinpath("page.html").read_text()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid')}")

    body_doc = {"requestBody": {"required": True, "content": {
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}}}}}}

    @app.post("/predict", openapi_extra=body_doc, summary="Top-k classes of one image")
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000)):
        """The image as the raw body (Content-Type image/png, image/jpeg, ...) or as a
        multipart file field. Answers {"top": [{"class", "index", "prob"}...], "batch_size"}."""
        m, start = http_metrics(), time.perf_counter()
        try:
            kind = check_type(request.headers.get("content-type"))
            body = await read_body(request, limits["max_body_bytes"])
            if kind == "multipart/form-data":
                body = await file_from_form(request, body)
            args = (body, info["preprocess"], limits["max_image_pixels"])
            image = (await asyncio.to_thread(decode_image, *args)
                     if len(body) > DECODE_IN_THREAD else decode_image(*args))
        except BadInput as e:
            m.requests.labels(str(e.status)).inc()
            m.errors.labels("bad_input").inc()
            return _error(e.status, e.message)
        if pending[0] >= limits["max_queue"]:  # again: no await from here to the increment
            return overloaded(m)
        pending[0] += 1
        m.queue.inc()
        try:
            result = await run_one(image, top_k)
        except HTTPException as e:
            m.requests.labels(str(e.status_code)).inc()
            m.errors.labels("internal").inc()
            return _error(e.status_code, f"the model failed on this request ({e.detail})")
        finally:
            pending[0] -= 1
            m.queue.dec()
        m.requests.labels("200").inc()
        m.latency.observe(time.perf_counter() - start)
        return JSONResponse(result)

    def overloaded(m) -> JSONResponse:
        m.requests.labels("503").inc()
        m.errors.labels("overloaded").inc()
        return _error(503, busy_message(limits), {"Retry-After": "1"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/metadata", summary="The model, its preprocessing, engine and limits")
    async def metadata():
        workers = [json.loads(p.read_text()) for p in sorted(state_dir.glob("worker-*.json"))]
        return {**meta, "engine": workers[0]["engine"] if workers else None,
                "precision": workers[0]["precision"] if workers else None,
                "workers": workers, "queue_depth": pending[0]}

    @app.get("/metrics", summary="Prometheus text format")
    async def metrics():
        body, content_type = exposition()
        return Response(body, media_type=content_type)

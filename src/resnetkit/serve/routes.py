"""The HTTP side of `resnetkit serve`: LitServe's FastAPI app given the routes it lacks (the
page, /metadata, /metrics, a POST /predict that takes raw image bytes or a multipart file and
checks them before queueing), a bounded queue, and errors as {"error": sentence}."""
from __future__ import annotations

import asyncio
import json
import time
import types
from importlib import resources
from pathlib import Path
from typing import Any

from urllib.parse import parse_qs

from fastapi import HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..untrusted import shown
from .batcher import Batcher
from .decode import IMAGE_TYPES, BadInput, Decoder, check_type
from .logs import logger
from .metrics import exposition, http_metrics
from .protocol import DEADLINE_KEY

MAX_TOP_K = 1000
BODY_TIMEOUT_S = 30.0  # the longest pause inside an upload
BATCHES_IN_FLIGHT = 2  # per worker


async def read_body(receive, declared: str, limit: int, timeout_s: float = BODY_TIMEOUT_S,
                    deadline: float | None = None) -> bytes:
    """The request body from the ASGI `receive` channel, refused (413) as soon as it passes
    `limit` bytes (or at once when the declared Content-Length does), and (408) when the
    client sends nothing for `timeout_s` (a stalled upload holds no slot for ever) or the
    body is not in by `deadline` (the event loop's time, set per request by
    protocol.BoundedHttp: a trickle of bytes defeats the pause limit, not this one)."""
    too_big = BadInput(413, f"the upload is over the server's limit of {limit / 2**20:g} MB "
                            f"(--max-body-mb)")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    loop = asyncio.get_running_loop()
    late = BadInput(408, "the upload did not arrive within the server's time limit for a "
                         "request")
    chunks, size = [], 0
    while True:
        wait = timeout_s
        if deadline is not None:
            left = deadline - loop.time()
            if left <= 0:
                raise late
            wait = min(wait, left)
        try:
            message = await asyncio.wait_for(receive(), wait)
        except asyncio.TimeoutError:
            if wait < timeout_s:
                raise late from None
            raise BadInput(408, f"the upload stalled: nothing arrived for {timeout_s:g} s") \
                from None
        if message["type"] == "http.disconnect":
            raise BadInput(400, "the client closed the connection before the body arrived")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def file_from_form(scope, body: bytes) -> tuple[str, bytes]:
    """(file name, content) of the first file field of a multipart body."""
    from starlette.datastructures import UploadFile

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}
    try:
        form = await Request(scope, replay).form(max_files=1, max_fields=8)
    except Exception as e:  # the multipart parser's own exception types
        raise BadInput(400, f"the multipart body cannot be read "
                            f"({shown(str(e)[:120])})") from None
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    if not files:
        raise BadInput(400, "the multipart body has no file field: send the image as "
                            "a file field (curl -F file=@image.png)")
    return files[0].filename or "", await files[0].read()


def top_k_of(query_string: bytes) -> int:
    """The top_k query parameter (default 5; 1 to MAX_TOP_K), else BadInput 422."""
    values = parse_qs(query_string.decode("latin-1"), keep_blank_values=True).get("top_k")
    if not values:
        return 5
    text = values[-1].strip()
    quoted = shown(repr(text if len(text) <= 20 else text[:20] + "..."))
    digits = text[1:] if text[:1] in "+-" else text
    if not (digits.isascii() and digits.isdigit()):
        raise BadInput(422, f"query.top_k: must be a whole number, got {quoted}")
    if text.startswith("-") or len(digits.lstrip("0")) > len(str(MAX_TOP_K)):
        raise BadInput(422, f"query.top_k: must be from 1 to {MAX_TOP_K}, got {quoted[1:-1]}")
    k = int(digits)
    if not 1 <= k <= MAX_TOP_K:
        raise BadInput(422, f"query.top_k: must be from 1 to {MAX_TOP_K}, got {k}")
    return k


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def busy_message(limits: dict[str, Any]) -> str:
    return (f"the server is at its queue limit of {limits['max_queue']} requests "
            f"(--max-queue); retry shortly")


class FastPaths:
    """ASGI middleware in front of everything. /health, and POST /predict (the 503 of a full
    queue included), are answered here without FastAPI's routing, parameter validation and
    response classes: on a small model the HTTP process is the bottleneck, and what each
    request costs there decides the throughput and how long /health waits under overload.
    /health is 200 once every worker has loaded its model (LitServe's own makes a round
    trip to its manager process on every call)."""

    def __init__(self, app, predictor: Predictor, limits: dict[str, Any], state_dir: Path):
        self.app, self.predictor, self.limits, self.state_dir = app, predictor, limits, state_dir
        self.ready = False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/health" and scope["method"] in ("GET", "HEAD"):
                if not self.ready:
                    found = len(list(self.state_dir.glob("worker-*.json")))
                    self.ready = found >= self.limits["workers"]
                return await send_response(send, 200 if self.ready else 503,
                                           b"ok" if self.ready else b"not ready", b"text/plain")
            if path == "/predict" and scope["method"] == "POST":
                try:
                    answer = await self.predictor(scope, receive)
                except Exception as e:  # a fault of ours: logged, and one JSON sentence
                    logger.exception("POST /predict failed")
                    http_metrics().requests.labels("500").inc()
                    http_metrics().errors.labels("internal").inc()
                    answer = (500, json.dumps({"error": f"the server failed on this request "
                                                        f"({type(e).__name__})"}).encode(),
                              b"application/json", [])
                return await send_response(send, *answer)
        await self.app(scope, receive, send)


async def send_response(send, status: int, body: bytes, kind: bytes = b"application/json",
                        extra=()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", kind), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


class Predictor:
    """POST /predict: the image as the raw body or a multipart file field, checked and
    decoded here (a bad upload never reaches a batch), then queued for a batch; answers
    (status, JSON body, content type, extra headers). A request holds a place in the queue
    from the moment its body is in, while it waits to be decoded (decode.Decoder) and then
    for its batch: beyond `max_queue` such requests the answer is 503 with Retry-After."""

    def __init__(self, run_one, info: dict[str, Any], limits: dict[str, Any]):
        self.run_one, self.info, self.limits = run_one, info, limits
        self.pending = 0  # accepted requests not yet answered, in this HTTP process
        self.busy = json.dumps({"error": busy_message(limits)}).encode()
        self.decode = Decoder(info["preprocess"], limits["max_image_pixels"])

    def _refuse(self, m, status: int, message: str, kind: str):
        m.requests.labels(str(status)).inc()
        m.errors.labels(kind).inc()
        if kind == "overloaded":
            return 503, self.busy, b"application/json", [(b"retry-after", b"1")]
        return status, json.dumps({"error": message}).encode(), b"application/json", []

    def _bad_input(self, m, scope, e: BadInput, name: str | None):
        client = scope.get("client")
        logger.info("refused %s from %s: %d, %s",
                    "a raw body" if name is None else f"the file {shown(repr(name))}",
                    f"{client[0]}:{client[1]}" if client else "an unknown client", e.status,
                    e.message)
        return self._refuse(m, e.status, e.message, "bad_input")

    async def __call__(self, scope, receive):
        m, start = http_metrics(), time.perf_counter()
        if self.pending >= self.limits["max_queue"]:
            return self._refuse(m, 503, "", "overloaded")
        headers = dict(scope["headers"])
        name = None
        try:
            top_k = top_k_of(scope.get("query_string", b""))
            kind = check_type(headers.get(b"content-type", b"").decode("latin-1"))
            body = await read_body(receive, headers.get(b"content-length", b"").decode(
                "latin-1"), self.limits["max_body_bytes"],
                self.limits.get("body_timeout_s", BODY_TIMEOUT_S), scope.get(DEADLINE_KEY))
            if kind == "multipart/form-data":
                name, body = await file_from_form(scope, body)
        except BadInput as e:
            return self._bad_input(m, scope, e, name)
        if self.pending >= self.limits["max_queue"]:  # again: no await since the last check
            return self._refuse(m, 503, "", "overloaded")
        self.pending += 1
        m.queue.inc()
        try:
            image = await self.decode(body)
            result = await self.run_one(image, top_k)
        except BadInput as e:
            return self._bad_input(m, scope, e, name)
        except HTTPException as e:
            return self._refuse(m, e.status_code, f"the model failed on this request "
                                                  f"({shown(e.detail)})", "internal")
        finally:
            self.pending -= 1
            m.queue.dec()
        m.requests.labels("200").inc()
        m.latency.observe(time.perf_counter() - start)
        return 200, json.dumps(result).encode(), b"application/json", []


def add_routes(server, api, info: dict[str, Any], meta: dict[str, Any], limits: dict[str, Any],
               state_dir: Path) -> None:
    """Replace LitServe's / and POST /predict with ours; add POST /explain, /metadata and
    /metrics; errors as {"error": sentence}."""
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
            # two batches in flight per worker: while one runs, the next waits in the
            # worker's queue, so the worker never idles through the hand-over
            batcher.append(Batcher(lambda payload: handler.handle_request(payload, dict),
                                   limits["max_batch"], limits["batch_timeout_ms"] / 1000,
                                   BATCHES_IN_FLIGHT * limits["workers"]))
        return await batcher[0](image, top_k)

    predictor = Predictor(run_one, info, limits)

    async def explain_one(image, top_k: int) -> dict[str, Any]:
        # one image per call: Grad-CAM runs a backward pass, which a batch would not share
        return await handler.handle_request({"image": image, "top_k": top_k, "explain": True},
                                            dict)
    explainer = Predictor(explain_one, info, limits)

    def build_middleware_stack(self):
        # FastPaths outside every layer FastAPI adds (its error, body-limit and telemetry
        # middleware wrap each call and each send: 5-10% of the HTTP process's time per
        # request under load); Starlette builds the stack at the first request
        return FastPaths(type(self).build_middleware_stack(self), predictor, limits, state_dir)
    app.build_middleware_stack = types.MethodType(build_middleware_stack, app)
    _add_error_handlers(app)

    body_doc = {"requestBody": {"required": True, "content": {
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}}}}}}

    @app.post("/predict", openapi_extra=body_doc, summary="Top-k classes of one image")
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=MAX_TOP_K)):
        """The image as the raw body (Content-Type image/png, image/jpeg, ...) or as a
        multipart file field. Answers {"top": [{"class", "index", "prob"}...], "batch_size"}.
        (Served by the middleware ahead of FastAPI, with the same handler; this route gives
        the OpenAPI entry and serves the app where the middleware is not in front.)"""
        status, body, kind, extra = await predictor(request.scope, request.receive)
        return Response(body, status, {k.decode(): v.decode() for k, v in extra},
                        media_type=kind.decode())

    @app.post("/explain", openapi_extra=body_doc,
              summary="Top-k classes of one image and a Grad-CAM heatmap of the first")
    async def explain(request: Request, top_k: int = Query(5, ge=1, le=MAX_TOP_K)):
        """As /predict, plus "why": {"class", "method": "gradcam", "layer", "heatmap" (an
        RGBA PNG data URL at the model's input size), "view" (the image as the model saw it,
        resized and centre-cropped, a PNG data URL)}. 400 for a model without gradients (an
        exported ONNX or OpenVINO file)."""
        if not meta.get("explain"):
            return _error(400, "this model cannot show why: it is an exported file, which "
                               "has no gradients; serve its checkpoint or run folder instead")
        status, body, kind, extra = await explainer(request.scope, request.receive)
        return Response(body, status, {k.decode(): v.decode() for k, v in extra},
                        media_type=kind.decode())

    _add_info_routes(app, meta, predictor, state_dir)


def _add_error_handlers(app) -> None:
    """Every error as {"error": sentence}: FastAPI's, the router's 404/405, bad queries."""

    @app.exception_handler(StarletteHTTPException)  # FastAPI's, and the router's 404/405
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid')}")


def _add_info_routes(app, meta: dict[str, Any], predictor: Predictor, state_dir: Path) -> None:
    """The page (/), /metadata (the model card with the workers' engines) and /metrics."""
    page = resources.files("resnetkit.serve").joinpath("page.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/metadata", summary="The model, its preprocessing, engine and limits")
    async def metadata():
        workers = [json.loads(p.read_text()) for p in sorted(state_dir.glob("worker-*.json"))]
        return {**meta, "engine": workers[0]["engine"] if workers else None,
                "precision": workers[0]["precision"] if workers else None,
                "workers": workers, "queue_depth": predictor.pending}

    @app.get("/metrics", summary="Prometheus text format")
    async def metrics():
        body, content_type = exposition()
        return Response(body, media_type=content_type)

"""The HTTP side of `resnetkit serve`: LitServe's FastAPI app given the routes it lacks (the
page, /metadata, /metrics, a POST /predict that takes raw image bytes or a multipart file and
checks them before queueing, the Open Inference Protocol's /v2 routes), a bounded queue, the
API key, and errors as {"error": sentence}."""
from __future__ import annotations

import asyncio
import json
import types
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import KeyCheck
from .batcher import Batcher
from .decode import IMAGE_TYPES, BadInput
from .logs import logger
from .metrics import exposition, http_metrics
from .predictor import MAX_TOP_K, Predictor
from .repository import read_json
from .routing import Models, Served
from .v2_routes import OpenInference, answer_v2

BATCHES_IN_FLIGHT = 2  # per worker


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class FastPaths:
    """ASGI middleware in front of everything. The API key is checked here (auth.py), and
    /health, POST /predict (the 503 of a full queue included) and the /v2 routes are
    answered here without FastAPI's routing, parameter validation and response classes: on
    a small model the HTTP process is the bottleneck, and what each request costs there
    decides the throughput and how long /health waits under overload. /health is 200 once
    every worker has loaded its models (LitServe's own makes a round trip to its manager
    process on every call)."""

    def __init__(self, app, predictor: Predictor, v2: OpenInference, models: Models,
                 key: KeyCheck | None):
        self.app, self.predictor, self.v2, self.models, self.key = app, predictor, v2, models, key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.models.watch()
            if self.key is not None and not self.key.allowed(scope):
                return await send_response(send, *self.key.refusal)
            path = scope["path"]
            if path == "/health" and scope["method"] in ("GET", "HEAD"):
                if not self.models.ready:
                    self.models.refresh()
                ready = self.models.ready
                return await send_response(send, 200 if ready else 503,
                                           b"ok" if ready else b"not ready", b"text/plain")
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
            if path == "/v2" or path.startswith("/v2/"):
                return await send_response(send, *await answer_v2(self.v2, scope, receive))
        await self.app(scope, receive, send)


async def send_response(send, status: int, body: bytes, kind: bytes = b"application/json",
                        extra=()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", kind), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


def add_routes(server, api, limits: dict[str, Any], state_dir: Path, key: KeyCheck | None,
               poll_s: float) -> None:
    """Replace LitServe's / and POST /predict with ours; add POST /explain, /metadata,
    /metrics and the /v2 routes; the API key where one is set; errors as {"error": ...}.
    The routing table (routing.Models) follows the workers' reports every half poll."""
    from litserve.server import RegularRequestHandler

    app = server.app
    app.router.routes[:] = [r for r in app.router.routes
                            if getattr(r, "path", None) not in ("/", "/predict", "/health")]
    handler = RegularRequestHandler(api, server)
    models = Models(state_dir, limits["workers"],
                    batchers(lambda payload: handler.handle_request(payload, dict), limits),
                    limits["max_image_pixels"],
                    interval_s=min(max(poll_s / 2, 0.2), 2.0) if poll_s > 0 else 5.0)

    async def run_one(served: Served, image, top_k: int) -> dict[str, Any]:
        if limits["batching"] == "litserve":
            return await handler.handle_request({"model": served.key, "image": image,
                                                 "top_k": top_k}, dict)
        return await served.batcher(image, top_k)

    async def explain_one(served: Served, image, top_k: int) -> dict[str, Any]:
        # one image per call: Grad-CAM runs a backward pass, which a batch would not share
        return await handler.handle_request({"model": served.key, "image": image,
                                             "top_k": top_k, "explain": True}, dict)
    predictor = Predictor(run_one, models, limits)
    explainer = Predictor(explain_one, models, limits)
    v2 = OpenInference(models, predictor, limits)

    def build_middleware_stack(self):
        # FastPaths outside every layer FastAPI adds (its error, body-limit and telemetry
        # middleware wrap each call and each send: 5-10% of the HTTP process's time per
        # request under load); Starlette builds the stack at the first request
        return FastPaths(type(self).build_middleware_stack(self), predictor, v2, models, key)
    app.build_middleware_stack = types.MethodType(build_middleware_stack, app)
    _add_error_handlers(app)
    _add_predict_routes(app, predictor, explainer, models)
    _add_info_routes(app, limits, predictor, models)


def batchers(handler_submit, limits: dict[str, Any]):
    """make_batcher(key) for Models: one batcher per load, all sharing the workers' slots
    (two batches in flight per worker: while one runs, the next waits in the worker's
    queue, so the worker never idles through the hand-over)."""
    slots: list[asyncio.Semaphore] = []  # made in the HTTP process, on its event loop

    def make(key: str) -> Batcher:
        if not slots:
            slots.append(asyncio.Semaphore(BATCHES_IN_FLIGHT * limits["workers"]))
        return Batcher(lambda payload: handler_submit({**payload, "model": key}),
                       limits["max_batch"], limits["batch_timeout_ms"] / 1000, slots[0])
    return make


def _add_predict_routes(app, predictor: Predictor, explainer: Predictor, models: Models) -> None:
    body_doc = {"requestBody": {"required": True, "content": {
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"}}}}}}}

    @app.post("/predict", openapi_extra=body_doc, summary="Top-k classes of one image")
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=MAX_TOP_K),
                      model: str | None = None, version: str | None = None):
        """The image as the raw body (Content-Type image/png, image/jpeg, ...) or as a
        multipart file field; `model` and `version` pick a model of the repository (by
        default the first by name, at its highest version). Answers {"top": [{"class",
        "index", "prob"}...], "batch_size"}. (Served by the middleware ahead of FastAPI,
        with the same handler; this route gives the OpenAPI entry.)"""
        status, body, kind, extra = await predictor(request.scope, request.receive)
        return Response(body, status, {k.decode(): v.decode() for k, v in extra},
                        media_type=kind.decode())

    @app.post("/explain", openapi_extra=body_doc,
              summary="Top-k classes of one image and a Grad-CAM heatmap of the first")
    async def explain(request: Request, top_k: int = Query(5, ge=1, le=MAX_TOP_K),
                      model: str | None = None, version: str | None = None):
        """As /predict, plus "why": {"class", "method": "gradcam", "layer", "heatmap" (an
        RGBA PNG data URL at the model's input size), "view" (the image as the model saw it,
        resized and centre-cropped, a PNG data URL)}. 400 for a model without gradients (an
        exported ONNX or OpenVINO file)."""
        try:
            served = models.find(model, version)
        except BadInput as e:
            return _error(e.status, e.message)
        if not served.info.get("explain"):
            return _error(400, "this model cannot show why: it is an exported file, which "
                               "has no gradients; serve its checkpoint or run folder instead")
        status, body, kind, extra = await explainer(request.scope, request.receive)
        return Response(body, status, {k.decode(): v.decode() for k, v in extra},
                        media_type=kind.decode())


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


def _add_info_routes(app, limits: dict[str, Any], predictor: Predictor,
                     models: Models) -> None:
    """The page (/), /metadata (a model's card, engine and limits) and /metrics."""
    page = resources.files("resnetkit.serve").joinpath("page.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/metadata", summary="A model, its preprocessing, engine and the server's limits")
    async def metadata(model: str | None = None, version: str | None = None):
        """The model's name and version (by default the first model by name, at its highest
        version), classes, preprocessing, architecture and card, engine and precision; the
        server's limits, workers and queue depth; every model and version served."""
        try:
            served = models.find(model, version)
        except BadInput as e:
            return _error(e.status, e.message)
        workers = [r for r in (read_json(p) for p in sorted(
            models.state_dir.glob("worker-*.json"))) if r]
        return {**served.info, "limits": limits,
                "models": {n: sorted(models.table.get(n, {})) for n in models.names()},
                "workers": [{"threads": w.get("threads")} for w in workers],
                "queue_depth": predictor.pending}

    @app.get("/metrics", summary="Prometheus text format")
    async def metrics():
        body, content_type = exposition()
        return Response(body, media_type=content_type)

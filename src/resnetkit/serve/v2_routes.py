"""The Open Inference Protocol's REST routes (KServe v2, with Triton's binary tensor data
and classification extensions; the wire format is in v2.py):

    GET  /v2/health/live, /v2/health/ready, /v2 (server metadata)
    GET  /v2/models/NAME[/versions/V]            model metadata
    GET  /v2/models/NAME[/versions/V]/ready      model readiness
    POST /v2/models/NAME[/versions/V]/infer      inference
    POST /v2/repository/index                    the models and versions served (Triton's)

Every image of a request goes through its version's batcher, with /predict's requests.
Answers are (status, body, content type, extra headers), as routes.Predictor's."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import numpy as np
from fastapi import HTTPException

from ..untrusted import shown
from . import v2
from .decode import BadInput
from .logs import logger
from .metrics import http_metrics
from .predictor import read_body
from .protocol import DEADLINE_KEY
from .routing import Models, Served

JSON = b"application/json"
EXTENSIONS = ["binary_tensor_data", "classification"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("resnetkit")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _json(status: int, data: Any, extra=()) -> tuple[int, bytes, bytes, list]:
    return status, json.dumps(data).encode(), JSON, list(extra)


def _error(status: int, message: str) -> tuple[int, bytes, bytes, list]:
    return _json(status, {"error": message})


class OpenInference:
    """The /v2 routes; `predictor` is /predict's (routes.Predictor): the queue limit, the
    body reader and its counters are shared."""

    def __init__(self, models: Models, predictor, limits: dict[str, Any]):
        self.models, self.predictor, self.limits = models, predictor, limits

    async def __call__(self, scope, receive) -> tuple[int, bytes, bytes, list]:
        parts = scope["path"].rstrip("/").split("/")[2:]  # "/v2/models/x" -> ["models", "x"]
        method = scope["method"]
        try:
            if method in ("GET", "HEAD"):
                return self._get(parts)
            if method == "POST" and parts == ["repository", "index"]:
                return _json(200, self._index())
            if method == "POST" and len(parts) in (3, 5) and parts[0] == "models" \
                    and parts[-1] == "infer":
                return await self._infer(scope, receive, self._find(parts[1:-1]))
        except BadInput as e:
            return _error(e.status, e.message)
        known = parts[:1] in ([], ["health"], ["models"], ["repository"])
        return _error(405 if known and method not in ("GET", "HEAD", "POST") else 404,
                      f"no route {method} {shown(scope['path'][:100])} in the Open Inference "
                      f"Protocol")

    def _find(self, parts: list[str]) -> Served:
        """["NAME"] or ["NAME", "versions", "V"] -> the routed load (BadInput 404)."""
        if len(parts) == 3 and (parts[1] != "versions" or not parts[2]):
            raise BadInput(404, "model paths are /v2/models/NAME[/versions/VERSION]")
        return self.models.find(parts[0], parts[2] if len(parts) == 3 else None)

    def _get(self, parts: list[str]):
        if parts == ["health", "live"]:
            return _json(200, {"live": True})
        if parts == ["health", "ready"]:
            if not self.models.ready:
                self.models.refresh()
            return _json(200 if self.models.ready else 503, {"ready": self.models.ready})
        if parts == []:
            return _json(200, {"name": "resnetkit", "version": _version(),
                               "extensions": EXTENSIONS})
        if parts[:1] == ["models"] and len(parts) in (2, 3, 4, 5):
            ready = parts[-1] == "ready" and len(parts) in (3, 5)  # a model may be named "ready"
            where = parts[1:-1] if ready else parts[1:]
            if len(where) in (1, 3):
                served = self._find(where)
                if ready:
                    return _json(200, {"name": served.name, "ready": True})
                return _json(200, self.model_metadata(served))
        raise BadInput(404, "no such route in the Open Inference Protocol: see /docs or "
                            "docs/serving.md")

    def model_metadata(self, served: Served) -> dict[str, Any]:
        """The spec's $metadata_model_response for one routed version."""
        info = served.info
        chans, k = info["preprocess"]["in_chans"], len(info["classes"])
        return {"name": served.name, "versions": [str(v) for v in
                                                  sorted(self.models.table[served.name])],
                "platform": f"resnetkit_{info['engine']}",
                "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, chans]},
                           {"name": "image", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, k]}
                            for n in v2.OUTPUTS]}

    def _index(self) -> list[dict[str, Any]]:
        return [{"name": name, "version": str(v), "state": "READY"}
                for name in self.models.names() for v in sorted(self.models.table[name])]

    async def _infer(self, scope, receive, served: Served):
        # the version counts this request from the moment it was routed, its body's upload
        # included: a version removed or replaced meanwhile drains it rather than being
        # unloaded under it
        with served.accepted():
            return await self._infer_accepted(scope, receive, served)

    async def _infer_accepted(self, scope, receive, served: Served):
        p, m, start = self.predictor, http_metrics(), time.perf_counter()
        if p.pending >= self.limits["max_queue"]:
            return self._count(served, *p.refuse(m, 503, "", "overloaded"))
        headers = dict(scope["headers"])
        try:
            body = await read_body(receive, headers.get(b"content-length", b"").decode("latin-1"),
                                   self.limits["max_body_bytes"],
                                   deadline=scope.get(DEADLINE_KEY))
            length = headers.get(v2.HEADER.encode())
            info = served.info
            req = v2.parse(body, None if length is None else length.decode("latin-1"),
                           info["preprocess"]["in_chans"], self.limits, len(info["classes"]))
        except BadInput as e:
            return self._count(served, *p.bad_input(m, scope, e, None))
        del body
        n = len(req.images)
        if p.pending + n > self.limits["max_queue"]:
            return self._count(served, *p.refuse(m, 503, "", "overloaded"))
        p.pending += n
        m.queue.inc(n)
        try:
            logits = await self._run(served, req)
        except BadInput as e:
            return self._count(served, *p.bad_input(m, scope, e, None))
        except HTTPException as e:
            return self._count(served, *p.refuse(m, e.status_code, f"the model failed on this "
                                                 f"request ({shown(e.detail)})", "internal"))
        finally:
            p.pending -= n
            m.queue.dec(n)
        out, head = v2.answer(req, logits, served.name, served.version, served.info["classes"])
        m.latency.observe(time.perf_counter() - start)
        extra = [] if head is None else [(v2.HEADER.encode(), str(head).encode())]
        kind = JSON if head is None else b"application/octet-stream"
        return self._count(served, 200, out, kind, extra)

    async def _run(self, served: Served, req: v2.Infer) -> np.ndarray:
        """The batch's logits: each image decoded, then run in its version's batches."""
        if req.input == "pixels":
            inputs = [await served.decoder.pixels(a) for a in req.images]
        else:
            inputs = [await served.decoder(b) for b in req.images]
        # each image as one /predict request (top_k 0: the logits), in the same batches:
        # the HTTP side's batcher, or LitServe's with --batching litserve
        run = self.predictor.run_one
        if len(inputs) == 1:  # the common case: no tasks to make
            results = [await run(served, inputs[0], 0)]
        else:
            results = await asyncio.gather(*(run(served, x, 0) for x in inputs))
        return np.stack([r["logits"] for r in results])

    def _count(self, served: Served, status: int, *rest):
        if status == 200:
            http_metrics().requests.labels("200").inc()
        http_metrics().model_requests.labels(served.name, str(served.version), str(status)).inc()
        return (status, *rest)


async def answer_v2(handler: OpenInference, scope, receive):
    """The handler's answer, or one JSON sentence (500) for a fault of ours."""
    try:
        return await handler(scope, receive)
    except Exception as e:
        logger.exception("%s %s failed", scope["method"], shown(scope["path"][:100]))
        return _error(500, f"the server failed on this request ({type(e).__name__})")

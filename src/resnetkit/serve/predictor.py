"""POST /predict (and /explain): an image as the raw body or a multipart file field, checked
and decoded in the HTTP process (a bad upload never reaches a batch), queued for its model's
batch, answered as {"top": [...], "batch_size"}; and the request body reader every route
shares, bounded in size and time."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

from fastapi import HTTPException, Request

from ..untrusted import shown
from .decode import BadInput, check_type
from .logs import logger
from .metrics import http_metrics
from .protocol import DEADLINE_KEY
from .routing import Models, Served

MAX_TOP_K = 1000
BODY_TIMEOUT_S = 30.0  # the longest pause inside an upload


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


def busy_message(limits: dict[str, Any]) -> str:
    return (f"the server is at its queue limit of {limits['max_queue']} requests "
            f"(--max-queue); retry shortly")


def model_query(query_string: bytes) -> tuple[str | None, str | None]:
    """The `model` and `version` query parameters of /predict, /explain and /metadata
    (None where absent: the first model by name, its highest version)."""
    q = parse_qs(query_string.decode("latin-1"))
    return (q["model"][-1] if q.get("model") else None,
            q["version"][-1] if q.get("version") else None)


RunOne = Callable[[Served, Any, int], Awaitable[dict[str, Any]]]


class Predictor:
    """POST /predict: the image as the raw body or a multipart file field, checked and
    decoded here (a bad upload never reaches a batch), then queued for a batch of its model
    (`?model=NAME&version=V`; by default the first model by name, at its highest version);
    answers (status, JSON body, content type, extra headers). A request holds a place in
    the queue from the moment its body is in, while it waits to be decoded
    (decode.Decoder) and then for its batch: beyond `max_queue` such requests (the /v2
    routes' images counted with them) the answer is 503 with Retry-After."""

    def __init__(self, run_one: RunOne, models: Models, limits: dict[str, Any]):
        self.run_one, self.models, self.limits = run_one, models, limits
        self.pending = 0  # accepted requests not yet answered, in this HTTP process
        self.busy = json.dumps({"error": busy_message(limits)}).encode()

    def refuse(self, m, status: int, message: str, kind: str):
        """The answer (status, body, type, headers) of a refused request, counted."""
        m.requests.labels(str(status)).inc()
        m.errors.labels(kind).inc()
        if kind == "overloaded":
            return 503, self.busy, b"application/json", [(b"retry-after", b"1")]
        return status, json.dumps({"error": message}).encode(), b"application/json", []

    def bad_input(self, m, scope, e: BadInput, name: str | None):
        """A user's mistake: logged (escaped) at INFO, answered with its one sentence."""
        client = scope.get("client")
        logger.info("refused %s from %s: %d, %s",
                    "a raw body" if name is None else f"the file {shown(repr(name))}",
                    f"{client[0]}:{client[1]}" if client else "an unknown client", e.status,
                    e.message)
        return self.refuse(m, e.status, e.message, "bad_input")

    async def __call__(self, scope, receive):
        m, start = http_metrics(), time.perf_counter()
        if self.pending >= self.limits["max_queue"]:
            return self.refuse(m, 503, "", "overloaded")
        try:
            query = scope.get("query_string", b"")
            top_k = top_k_of(query)
            served = self.models.find(*model_query(query))
        except BadInput as e:
            return self.bad_input(m, scope, e, None)
        # the version counts this request from the moment it was routed, its body's upload
        # included: a version removed or replaced meanwhile drains it rather than being
        # unloaded under it
        with served.accepted():
            return await self._accepted(m, scope, receive, served, top_k, start)

    async def _accepted(self, m, scope, receive, served: Served, top_k: int, start: float):
        headers = dict(scope["headers"])
        name = None
        try:
            kind = check_type(headers.get(b"content-type", b"").decode("latin-1"))
            body = await read_body(receive, headers.get(b"content-length", b"").decode(
                "latin-1"), self.limits["max_body_bytes"],
                self.limits.get("body_timeout_s", BODY_TIMEOUT_S), scope.get(DEADLINE_KEY))
            if kind == "multipart/form-data":
                name, body = await file_from_form(scope, body)
        except BadInput as e:
            return self.bad_input(m, scope, e, name)
        if self.pending >= self.limits["max_queue"]:  # again: no await since the last check
            return self.refuse(m, 503, "", "overloaded")
        answer = await self._queued(m, scope, served, body, top_k, name)
        m.model_requests.labels(served.name, str(served.version), str(answer[0])).inc()
        if answer[0] == 200:
            m.latency.observe(time.perf_counter() - start)
        return answer

    async def _queued(self, m, scope, served: Served, body: bytes, top_k: int,
                      name: str | None):
        self.pending += 1
        m.queue.inc()
        try:
            image = await served.decoder(body)
            result = await self.run_one(served, image, top_k)
        except BadInput as e:
            return self.bad_input(m, scope, e, name)
        except HTTPException as e:
            return self.refuse(m, e.status_code, f"the model failed on this request "
                                                 f"({shown(e.detail)})", "internal")
        finally:
            self.pending -= 1
            m.queue.dec()
        m.requests.labels("200").inc()
        return 200, json.dumps(result).encode(), b"application/json", []

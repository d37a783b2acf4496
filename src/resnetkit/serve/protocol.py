"""The HTTP connection: uvicorn's httptools protocol with the two bounds it lacks.

A request's head (request line and headers) is refused with 431 once it passes
`max_head_bytes` or MAX_HEAD_LINES header lines, before the parser buffers any more of it
(llhttp has no limit, and uvicorn's only one, h11_max_incomplete_event_size, is for its
pure-Python h11 protocol, which parses a request in about 34 us against httptools' 1.4 us:
on a small model the HTTP process is the bottleneck). And a request has `deadline_s` from
its connection or its first byte to its last body byte: a head still arriving then is
answered 408, a body still arriving is answered 408 by the route (routes.read_body reads
the deadline from the scope) and its connection closed CLOSE_GRACE_S later whatever the
route did. uvicorn has no such deadline: its keep-alive timer ends at the first byte, so one
byte every few seconds held a connection and its buffers for ever. All this costs about 7 us
per request (uvicorn's round trip for a no-op app, 32 -> 39 us; the HTTP side takes 0.30 ms
per request on a small model in all)."""
from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

# Header lines in one request: browsers and HTTP clients send 5 to 20; each line is a tuple
# of two bytes objects in the ASGI scope, and every route walks the list.
MAX_HEAD_LINES = 100
# How long a refused client has to read its answer, and a route past the deadline to send
# its 408, before the connection is closed. Closing at once with unread input makes the
# kernel send a reset, which a client sees instead of the answer.
CLOSE_GRACE_S = 1.0
# The scope's entry for the loop time (loop.time()) by which the body must have arrived.
DEADLINE_KEY = "resnetkit.deadline"


class BoundedHttp(HttpToolsProtocol):
    """uvicorn's HttpToolsProtocol with a bounded head and a deadline per request (see the
    module's docstring). Configured by subclassing: see `bounded_protocol`."""

    max_head_bytes = 64 << 10
    deadline_s = 60.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_bytes = 0  # bytes received since the last head was complete
        self.head_lines = 0
        self.heads_done = 0
        self.in_head = True
        self.refusal: tuple[int, str] | None = None
        self.refused = False
        # the clock: one timer per connection, moved on lazily (making and cancelling a
        # timer for each request cost 4 us in uvloop, against 7 us for all the rest here)
        self.reading = True  # a request is arriving: from its first byte to its last
        self.deadline_at = self.loop.time() + self.deadline_s
        self.timer: Any = self.loop.call_at(self.deadline_at, self._expired)
        # (a connection that never sends a byte is closed at its deadline too)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def _stop_clock(self) -> None:
        self.reading = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        if self.refused:  # answered and closing: what still arrives is dropped unread
            return
        if self.in_head:
            room = self.max_head_bytes - self.head_bytes
            self.head_bytes += len(data)
            if len(data) > room:
                # the read may hold the end of the head and a body: the parser is given the
                # limit's worth first, and the rest only if the head ended within it
                done = self.heads_done
                if room > 0:
                    super().data_received(data[:room])
                if self.heads_done == done and not self.transport.is_closing():
                    self.refusal = (431, f"the request's headers are over the server's limit "
                                         f"of {self.max_head_bytes / 1024:g} KiB")
                data = data[room:]
        if not self.refusal and not self.transport.is_closing():
            super().data_received(data)
        if self.refusal and not self.refused:
            self._answer_and_close(*self.refusal)

    # parser callbacks: nothing more is kept once the request is refused
    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_lines += 1
        if self.head_lines > MAX_HEAD_LINES and not self.refusal:
            self.refusal = (431, f"the request has over {MAX_HEAD_LINES} header lines, the "
                                 f"server's limit")
        if not self.refusal:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.heads_done += 1
        self.in_head, self.head_bytes, self.head_lines = False, 0, 0
        if self.refusal:
            return
        self.scope[DEADLINE_KEY] = self.deadline_at  # type: ignore[literal-required]
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.refusal:
            super().on_body(body)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self.reading:  # the connection's first request keeps the clock of its start
            self.reading = True
            self.deadline_at = self.loop.time() + self.deadline_s
            if self.timer is None:
                self.timer = self.loop.call_at(self.deadline_at, self._expired)

    def on_message_complete(self) -> None:
        self.in_head = True
        self.reading = False  # the body is in: what the model takes is not the client's doing
        if not self.refusal:
            super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        self._stop_clock()  # the connection is the WebSocket protocol's from here
        super().handle_websocket_upgrade()

    def _expired(self) -> None:
        self.timer = None
        if self.transport.is_closing() or self.refused or not self.reading:
            return  # (between requests, uvicorn's keep-alive timeout closes an idle connection)
        if self.loop.time() < self.deadline_at:  # a later request's: the clock moves on
            self.timer = self.loop.call_at(self.deadline_at, self._expired)
            return
        if self.in_head and (self.cycle is None or self.cycle.response_complete):
            self._answer_and_close(408, f"the request's headers did not arrive within the "
                                        f"server's limit of {self.deadline_s:g} s")
        else:
            self.timer = self.loop.call_later(CLOSE_GRACE_S, self.transport.close)

    def _answer_and_close(self, status: int, message: str) -> None:
        """Answer {"error": message} with `status` outside any ASGI cycle (the request was
        refused before it became one), then stop reading and close."""
        self.refused = True
        self._stop_clock()
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # a pipelined request: the answer would cut into another
            return
        body = json.dumps({"error": message}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n",
                 b"content-length: ", str(len(body)).encode(), b"\r\n",
                 b"connection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer is all the client gets; it may finish sending
        self.timer = self.loop.call_later(CLOSE_GRACE_S, self.transport.close)


def bounded_protocol(max_head_bytes: int, deadline_s: float) -> type[BoundedHttp]:
    """The protocol class to give uvicorn (its `http` option) for these limits."""
    return type("BoundedHttp", (BoundedHttp,),
                {"max_head_bytes": int(max_head_bytes), "deadline_s": float(deadline_s)})

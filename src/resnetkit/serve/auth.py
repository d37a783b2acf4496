"""The API key: with `--api-key KEY` (or RESNETKIT_API_KEY) every route but the health checks
and the page itself needs `Authorization: Bearer KEY`, compared in constant time."""
from __future__ import annotations

import hmac
import json

# Open without the key: what a load balancer or orchestrator probes, and the page, which
# asks for the key and sends it on its own requests.
OPEN_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready", "/"})
MAX_KEY_CHARS = 4096


def check_key(key: str) -> str:
    """`key` if it can be an API key (printable ASCII without spaces, 16 to 4096 characters:
    what a client sends in a header), else ValueError with the reason."""
    if not (16 <= len(key) <= MAX_KEY_CHARS):
        raise ValueError(f"must be 16 to {MAX_KEY_CHARS} characters long, got {len(key)}")
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise ValueError("must be printable ASCII without spaces")
    return key


class KeyCheck:
    """Whether a request may pass: `allowed(scope)`; `refusal` is the answer otherwise."""

    def __init__(self, key: str):
        self.expected = key.encode()
        body = json.dumps({"error": "this server needs an API key: send the header "
                                    "'Authorization: Bearer KEY'"}).encode()
        self.refusal = (401, body, b"application/json", [(b"www-authenticate", b"Bearer")])

    def allowed(self, scope) -> bool:
        if scope["path"] in OPEN_PATHS and scope["method"] in ("GET", "HEAD"):
            return True
        got = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                got = value
                break
        # the scheme is case-insensitive (RFC 9110, 11.1): "bearer KEY" is as good
        scheme, _, token = got.partition(b" ")
        # the token compared whole in constant time: the time taken tells nothing about the key
        return hmac.compare_digest(token, self.expected) and scheme.lower() == b"bearer"

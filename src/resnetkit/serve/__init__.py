"""Serving: `resnetkit serve` (an HTTP server on LitServe with dynamic batching, a page to
try the model, Prometheus metrics). Heavy imports happen when a server starts."""


def serve(*args, **kwargs):
    """See serve.server.serve."""
    from .server import serve as run
    return run(*args, **kwargs)


__all__ = ["serve"]

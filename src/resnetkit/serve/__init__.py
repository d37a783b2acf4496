"""Serving: `resnetkit serve` (an HTTP server on LitServe with dynamic batching, a page to
try the model, Prometheus metrics). Heavy imports happen when a server starts:
`from resnetkit.serve import ServeConfig, serve` is light."""
from .config import ServeConfig, ServeHooks


def serve(source, config: ServeConfig | None = None, hooks: ServeHooks | None = None) -> int:
    """See serve.server.serve."""
    from .server import serve as run
    return run(source, config, hooks)


__all__ = ["ServeConfig", "ServeHooks", "serve"]

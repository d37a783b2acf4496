"""`resnetkit serve`: a LitServe server for a ResNet classifier (routes in routes.py), and
a shutdown that drains and leaves no process behind.

Processes: this one (LitServe's supervisor), one HTTP process (uvicorn, forked; it decodes
uploads, so a bad one never reaches a batch), N inference workers (spawned; api.py) and
LitServe's queue manager."""
from __future__ import annotations

import gc
import multiprocessing
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from .engine import ENGINES, model_info
from .logs import escaped_log
from .metrics import mark_dead, use_folder
from .routes import add_routes

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds
# The inference workers run this much nicer than the HTTP process. Where they share cores,
# a request that waits to be read or answered costs latency and throughput, while a batch
# that starts a moment later only grows; on a small model the HTTP process is the
# bottleneck (see benchmarks/serve_load.py and the README's load figures).
WORKER_NICE = 5


def check_options(host: str, port: int, workers: int, max_batch: int, batch_timeout_ms: float,
                  engine: str, max_image_pixels: int, max_body_mb: float, max_queue: int,
                  threads: int = 0, max_header_kb: float = 64, request_timeout_s: float = 60
                  ) -> None:
    """One sentence for the first option out of range."""
    if host not in HOSTS:
        raise UserError(f"--host must be one of {', '.join(HOSTS)}, got {host!r}")
    if not 1024 <= port <= 65535:
        raise UserError(f"--port must be from 1024 to 65535, got {port}")
    for name, value, low in (("--workers", workers, 1), ("--max-batch", max_batch, 1),
                             ("--max-image-pixels", max_image_pixels, 1),
                             ("--max-queue", max_queue, 1)):
        if value < low:
            raise UserError(f"{name} must be at least {low}, got {value}")
    if threads < 0:
        raise UserError(f"--threads must be 0 (automatic: one core for the HTTP process, the "
                        f"rest divided among the workers) or a positive number of torch "
                        f"threads per worker, got {threads}")
    if batch_timeout_ms < 0 or max_body_mb <= 0:
        raise UserError("--batch-timeout-ms must be >= 0 and --max-body-mb > 0")
    if not 1 <= max_header_kb <= 1024:
        raise UserError(f"max_header_kb must be from 1 to 1024, got {max_header_kb:g}")
    if not 1 <= request_timeout_s <= 3600:
        raise UserError(f"request_timeout_s must be from 1 to 3600, got {request_timeout_s:g}")
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def serve(source: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          max_batch: int = 32, batch_timeout_ms: float = 5.0, engine: str = "auto",
          precision: str = "auto", max_image_pixels: int = 40_000_000, max_body_mb: float = 20,
          max_queue: int = 256, threads: int = 0, batching: str = "server",
          card: Callable[[Any, int], dict[str, Any]] | None = None,
          log_level: str = "warning", on_start: Callable[[dict[str, Any]], None] | None = None,
          calibration: str | None = None, worker_nice: int = WORKER_NICE,
          max_header_kb: float = 64, request_timeout_s: float = 60) -> int:
    """Serve a run folder, checkpoint, registry tag or ONNX file until SIGTERM or SIGINT, then
    drain: the HTTP process stops accepting, answers what it accepted, and every process
    ends. Returns 0. `card(config, image_size)` gives the page's model card (the CLI passes
    analysis.card.model_card); threads: torch threads per worker (0: one core for HTTP, the rest
    shared by the workers);
    batching: "server" (gathered in the HTTP process, batcher.py) or "litserve" (LitServe's
    own, in the worker); precision "int8" needs `calibration` (a dataset spec, checked here
    before any process starts; see engine.open_engine); worker_nice: see WORKER_NICE;
    max_header_kb: the most a request's line and headers may take (431 beyond, as beyond
    100 header lines); request_timeout_s: the most a request's head and body may take to
    arrive (408 beyond; see protocol.py).
    Raises UserError for a bad option or an unreadable model."""
    check_options(host, port, workers, max_batch, batch_timeout_ms, engine, max_image_pixels,
                  max_body_mb, max_queue, threads, max_header_kb, request_timeout_s)
    if batching not in ("server", "litserve"):
        raise UserError(f"batching must be server or litserve, got {batching!r}")
    if not 0 <= worker_nice <= 19:
        raise UserError(f"worker_nice must be from 0 to 19, got {worker_nice}")
    info = model_info(source)
    if precision == "int8":
        from .engine import int8_calibration, int8_engine
        int8_engine(engine)  # installed, or one sentence now rather than in every worker
        int8_calibration(source, calibration)
    elif calibration:
        raise UserError("--calibration is for --precision int8 only")
    cfg, size = info["config"], info["preprocess"]["image_size"]
    state_dir = Path(tempfile.mkdtemp(prefix="resnetkit-serve-"))
    (state_dir / "metrics").mkdir()
    use_folder(state_dir / "metrics")
    import litserve as ls
    from .api import ClassifierAPI
    from .protocol import bounded_protocol
    if not threads:  # one core left to the HTTP process, which decodes every upload
        threads = max(1, (multiprocessing.cpu_count() - 1) // workers)
    limits = {"max_batch": max_batch, "batch_timeout_ms": batch_timeout_ms,
              "max_queue": max_queue, "max_image_pixels": max_image_pixels,
              "max_body_bytes": int(max_body_mb * 2**20), "workers": workers,
              "threads_per_worker": threads, "batching": batching, "worker_nice": worker_nice,
              "max_header_bytes": int(max_header_kb * 1024),
              "request_timeout_s": request_timeout_s}
    arch = None
    if cfg is not None:
        from ..weights.checkpoint import config_to_dict
        arch = config_to_dict(cfg)
    meta = {"source": str(source), "architecture": arch, "classes": info["classes"],
            "preprocess": info["preprocess"], "limits": limits,
            "card": card(cfg, size) if card and cfg is not None else None}
    api = ClassifierAPI(str(source), engine, precision, info["preprocess"], info["classes"],
                        str(state_dir), max_batch if batching == "litserve" else 1,
                        batch_timeout_ms / 1000 if batching == "litserve" else 0.0, threads,
                        calibration, worker_nice)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers, timeout=60,
                          fast_queue=True)  # responses over ZMQ, not the manager's queues
    add_routes(server, api, info, meta, limits, state_dir)

    def stop(signum, frame):
        event = server._shutdown_event
        if event is None:  # still starting: unwind run(), the children are ended below
            raise KeyboardInterrupt
        # set from another thread: this one may be inside a call on the same manager proxy
        threading.Thread(target=event.set, daemon=True).start()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    with escaped_log(log_level):  # every log line escaped, in every process forked below
        try:
            if on_start:
                on_start({"url": f"http://{host}:{port}", **meta, "card": None})
            # The HTTP process is forked from this one and inherits its heap: millions of
            # objects from torch, FastAPI and the model's analysis. Frozen, they are left out of
            # every garbage collection there, whose full passes otherwise stop its event loop
            # for tens of milliseconds under load.
            gc.collect()
            gc.freeze()
            server.run(host=host, port=port, num_api_servers=1, generate_client_file=False,
                       log_level=log_level, api_server_worker_type="process",
                       http=bounded_protocol(limits["max_header_bytes"], request_timeout_s))
        except KeyboardInterrupt:
            pass
        finally:
            gc.unfreeze()
            for p in multiprocessing.active_children():  # whatever LitServe did not end
                p.terminate()
                p.join(10)
                if p.is_alive():
                    p.kill()
                mark_dead(p.pid)
            for s, h in old.items():
                signal.signal(s, h)
            shutil.rmtree(state_dir, ignore_errors=True)
    return 0

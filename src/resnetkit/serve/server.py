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
from typing import Any

from ..errors import UserError
from ..infer.runner import check_runner
from ..infer.source import open_source
from .auth import KeyCheck
from .config import ServeConfig, ServeHooks
from .logs import escaped_log
from .metrics import mark_dead, use_folder
from .repository import Repository
from .routes import add_routes


def serve(source: str | None, config: ServeConfig | None = None,
          hooks: ServeHooks | None = None) -> int:
    """Serve a run folder, checkpoint, registry tag or ONNX file (`source`, named
    config.name or after its folder or file, at version 1), or every model of
    config.model_repository (DIR/NAME/VERSION/, polled every config.poll_seconds for new,
    changed and removed versions), until SIGTERM or SIGINT, then drain: the HTTP process
    stops accepting, answers what it accepted, and every process ends. Returns 0.
    `config`: every option (ServeConfig, checked when it is built); `hooks`: the page's
    model card and a call once the server is about to listen (ServeHooks). precision
    "int8" is calibrated on config.calibration (a dataset spec, checked here before any
    process starts; see api.serving).
    Raises UserError for a bad option, an unreadable model or an empty repository."""
    c, hooks = config or ServeConfig(), hooks or ServeHooks()
    if (source is None) == (c.model_repository is None):
        raise UserError("serve one MODEL or --model-repository DIR (one of the two)")
    repo = Repository(c.model_repository, source, c.name, c.engine)
    repo.check()
    from .api import serving
    if source is not None:
        # the model readable, the engine installed and int8's calibration images readable:
        # one sentence now rather than in every worker
        check_runner(open_source(source), serving(c.engine, c.precision, c.calibration))
    state_dir = Path(tempfile.mkdtemp(prefix="resnetkit-serve-"))
    (state_dir / "metrics").mkdir()
    use_folder(state_dir / "metrics")
    import litserve as ls
    from .api import ClassifierAPI
    # one core left to the HTTP process, which decodes every upload
    threads = c.threads or max(1, (multiprocessing.cpu_count() - 1) // c.workers)
    limits = c.limits(threads)
    litserve_batch = c.batching == "litserve"
    api = ClassifierAPI(repo, c.engine, c.precision, str(state_dir),
                        c.max_batch if litserve_batch else 1,
                        c.batch_timeout_ms / 1000 if litserve_batch else 0.0, threads,
                        c.calibration, c.worker_nice, c.poll_seconds, hooks.card)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=c.workers, timeout=60,
                          fast_queue=True)  # responses over ZMQ, not the manager's queues
    add_routes(server, api, limits, state_dir, KeyCheck(c.api_key) if c.api_key else None,
               c.poll_seconds)
    models = [v.name for v in repo.scan()]
    return _run(server, c, hooks, {"models": sorted(set(models)), "limits": limits}, state_dir)


def _run(server, c: ServeConfig, hooks: ServeHooks, meta: dict[str, Any],
         state_dir: Path) -> int:
    """Listen until SIGTERM or SIGINT, then end every process and remove the state folder."""
    from .protocol import bounded_protocol

    def stop(signum, frame):
        event = server._shutdown_event
        if event is None:  # still starting: unwind run(), the children are ended below
            raise KeyboardInterrupt
        # set from another thread: this one may be inside a call on the same manager proxy
        threading.Thread(target=event.set, daemon=True).start()

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    with escaped_log(c.log_level):  # every log line escaped, in every process forked below
        try:
            if hooks.on_start:
                hooks.on_start({"url": f"http://{c.host}:{c.port}", **meta})
            # The HTTP process is forked from this one and inherits its heap: millions of
            # objects from torch, FastAPI and the model's analysis. Frozen, they are left out of
            # every garbage collection there, whose full passes otherwise stop its event loop
            # for tens of milliseconds under load.
            gc.collect()
            gc.freeze()
            server.run(host=c.host, port=c.port, num_api_servers=1, generate_client_file=False,
                       log_level=c.log_level, api_server_worker_type="process",
                       http=bounded_protocol(meta["limits"]["max_header_bytes"],
                                             c.request_timeout_s))
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

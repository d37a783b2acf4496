"""ServeConfig: every option of `resnetkit serve` as data, with its help text and its check
(the command line is built from these fields, as `resnetkit train`'s is from TrainConfig)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UserError

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds
LOOPBACK = ("127.0.0.1",)
KEY_ENV = "RESNETKIT_API_KEY"
ENGINES = ("auto", "torch", "onnxruntime", "openvino")
# The inference workers run this much nicer than the HTTP process. Where they share cores,
# a request that waits to be read or answered costs latency and throughput, while a batch
# that starts a moment later only grows; on a small model the HTTP process is the
# bottleneck (see benchmarks/serve_load.py and the README's load figures).
WORKER_NICE = 5


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A ServeConfig field with its help text (and its choices, for the command line)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ServeConfig:
    """How `resnetkit serve` listens, batches, runs the model and bounds what it accepts."""

    host: str = opt("127.0.0.1", "127.0.0.1 (this machine only), 0.0.0.0 or :: (every "
                                 "interface)", HOSTS)
    port: int = opt(8000, "TCP port (1024-65535)")
    workers: int = opt(1, "inference worker processes")
    threads: int = opt(0, "CPU threads per worker (0: one core for the HTTP process, the rest "
                          "divided among the workers)")
    max_batch: int = opt(32, "most requests batched together")
    batch_timeout_ms: float = opt(5.0, "how long a batch waits to fill up, in milliseconds")
    batching: str = opt("server", "where requests are gathered into batches: the HTTP process "
                                  "(server) or LitServe's worker loop (litserve; slower here)",
                        ("server", "litserve"))
    engine: str = opt("auto", "what runs the model (auto: onnxruntime for an .onnx file, else "
                              "torch)", ENGINES)
    precision: str = opt("auto", "auto: bf16 where the CPU has native bf16, else fp32; int8 "
                                 "needs --calibration", ("auto", "fp32", "bf16", "int8"))
    calibration: str | None = opt(None, "int8: the model's training images to calibrate on, "
                                         "e.g. fashion-mnist:512 or folder:DIR:512")
    worker_nice: int = opt(WORKER_NICE, "how much nicer (0-19) the inference workers run than "
                                        "the HTTP process, which goes first where they share "
                                        "cores")
    max_image_pixels: int = opt(40_000_000, "largest image accepted, width x height "
                                            "(decompression bombs)")
    max_body_mb: float = opt(20.0, "largest upload accepted, MB")
    max_queue: int = opt(256, "requests waiting at most; beyond it the answer is 503 with "
                              "Retry-After")
    max_header_kb: float = opt(64.0, "most a request's line and headers may take, KiB (431 "
                                     "beyond, as beyond 100 header lines)")
    request_timeout_s: float = opt(60.0, "most a request's head and body may take to arrive, "
                                         "seconds (408 beyond)")
    log_level: str = opt("warning", "server log verbosity", ("debug", "info", "warning", "error"))
    model_repository: str | None = opt(None, "serve every model of this folder, laid out as "
                                             "DIR/NAME/VERSION/ (instead of one MODEL)")
    poll_seconds: float = opt(0.0, "with --model-repository: look for new, changed and removed "
                                   "versions every this many seconds (0: never)")
    name: str | None = opt(None, "the model's name in the Open Inference Protocol's URLs "
                                 "(default: the run folder's or file's name)")
    api_key: str | None = field(default_factory=lambda: os.environ.get(KEY_ENV) or None,
                                repr=False, metadata={
        "help": f"every route but /health, /v2/health/* and the page needs 'Authorization: "
                f"Bearer KEY' (default: ${KEY_ENV})", "choices": None})
    insecure: bool = opt(False, "allow binding a host other than 127.0.0.1 without --api-key")

    def __post_init__(self) -> None:
        """One sentence for the first option out of range."""
        for f in dataclasses.fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if choices and value not in choices:
                raise UserError(f"--{_flag(f.name)} must be one of {', '.join(choices)}, "
                                f"got {value!r}")
        checks = [
            (1024 <= self.port <= 65535, "port", "from 1024 to 65535"),
            (self.workers >= 1, "workers", "at least 1"),
            (self.max_batch >= 1, "max_batch", "at least 1"),
            (self.max_image_pixels >= 1, "max_image_pixels", "at least 1"),
            (self.max_queue >= 1, "max_queue", "at least 1"),
            (self.threads >= 0, "threads", "0 (automatic: one core for the HTTP process, the "
                                           "rest divided among the workers) or a positive "
                                           "number of torch threads per worker"),
            (self.batch_timeout_ms >= 0, "batch_timeout_ms", ">= 0"),
            (self.max_body_mb > 0, "max_body_mb", "> 0"),
            (1 <= self.max_header_kb <= 1024, "max_header_kb", "from 1 to 1024"),
            (1 <= self.request_timeout_s <= 3600, "request_timeout_s", "from 1 to 3600"),
            (0 <= self.worker_nice <= 19, "worker_nice", "from 0 to 19"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise UserError(f"--{_flag(name)} must be {allowed}, got {getattr(self, name)!r}")
        if self.calibration and self.precision != "int8":
            raise UserError("--calibration is for --precision int8 only")
        self._check_access()

    def _check_access(self) -> None:
        if not 0 <= self.poll_seconds <= 86400:
            raise UserError(f"--poll-seconds must be from 0 to 86400, got {self.poll_seconds!r}")
        if self.poll_seconds and not self.model_repository:
            raise UserError("--poll-seconds is for --model-repository only")
        if self.name is not None and self.model_repository:
            raise UserError("--name names the one model served; a repository's models are "
                            "named by their folders")
        if self.api_key is not None:
            from .auth import check_key
            try:
                check_key(self.api_key)
            except ValueError as e:
                raise UserError(f"the API key (--api-key or ${KEY_ENV}) {e}") from None
        elif self.host not in LOOPBACK and not self.insecure:
            raise UserError(f"binding {self.host} without an API key would let anyone who can "
                            f"reach the port use the server: give --api-key KEY (or set "
                            f"${KEY_ENV}), or --insecure to do it anyway")

    def limits(self, threads: int) -> dict[str, Any]:
        """What /metadata reports and the routes enforce (`threads`: per worker, resolved)."""
        return {"max_batch": self.max_batch, "batch_timeout_ms": self.batch_timeout_ms,
                "max_queue": self.max_queue, "max_image_pixels": self.max_image_pixels,
                "max_body_bytes": int(self.max_body_mb * 2**20), "workers": self.workers,
                "threads_per_worker": threads, "batching": self.batching,
                "worker_nice": self.worker_nice,
                "max_header_bytes": int(self.max_header_kb * 1024),
                "request_timeout_s": self.request_timeout_s,
                "poll_seconds": self.poll_seconds, "api_key": self.api_key is not None}


@dataclass(frozen=True)
class ServeHooks:
    """What the caller plugs in: `card(config, image_size)` gives the page's model card (the
    CLI passes analysis.card.model_card); `on_start(meta)` is called once the options and
    the model are checked, before the server listens."""

    card: Callable[[Any, int], dict[str, Any]] | None = None
    on_start: Callable[[dict[str, Any]], None] | None = None


def _flag(name: str) -> str:
    return name.replace("_", "-")

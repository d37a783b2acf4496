"""Prometheus metrics shared by the HTTP process and the inference workers.

LitServe runs the model in worker processes, so the figures live in prometheus_client's
multiprocess mode: every process writes its own memory-mapped files in one folder, and
/metrics sums them. The folder must be named (PROMETHEUS_MULTIPROC_DIR) before
prometheus_client is first imported in a process, hence the imports inside functions."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from types import SimpleNamespace

ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def use_folder(folder: str | Path) -> None:
    """Point this process (and the processes it starts) at the metrics folder."""
    if "prometheus_client" in __import__("sys").modules and os.environ.get(ENV) != str(folder):
        raise RuntimeError("prometheus_client was imported before the metrics folder was set")
    os.environ[ENV] = str(folder)


@functools.lru_cache(maxsize=1)
def http_metrics() -> SimpleNamespace:
    """The HTTP side's metrics (created once per process)."""
    from prometheus_client import Counter, Gauge, Histogram
    return SimpleNamespace(
        requests=Counter("resnetkit_requests", "HTTP requests to /predict by status code",
                         ["code"]),
        errors=Counter("resnetkit_errors", "requests to /predict answered with an error, by "
                       "kind (bad_input, overloaded, draining, internal)", ["kind"]),
        latency=Histogram("resnetkit_request_latency_seconds", "time from a /predict "
                          "request's arrival to its answer", buckets=LATENCY_BUCKETS),
        queue=Gauge("resnetkit_queue_depth", "accepted /predict requests not yet answered",
                    multiprocess_mode="livesum"),
        model_requests=Counter("resnetkit_model_requests", "inference requests (/predict and "
                               "the Open Inference Protocol's infer) by model, version and "
                               "status code", ["model", "version", "code"]))


@functools.lru_cache(maxsize=1)
def worker_metrics() -> SimpleNamespace:
    """The inference workers' metrics (created once per process)."""
    from prometheus_client import Counter, Histogram
    return SimpleNamespace(
        batch=Histogram("resnetkit_batch_size", "images per batch the model ran on",
                        buckets=BATCH_BUCKETS),
        compute=Histogram("resnetkit_batch_seconds", "model time per batch (preprocessing "
                          "and forward pass)", buckets=LATENCY_BUCKETS),
        images=Counter("resnetkit_images", "images the model classified"),
        model_images=Counter("resnetkit_model_images", "images classified by model and "
                             "version", ["model", "version"]))


def exposition() -> tuple[bytes, str]:
    """(body, content type) of /metrics: every process's figures summed."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def mark_dead(pid: int) -> None:
    """Drop a finished process's live gauges (its counters stay in the sums)."""
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(pid)

"""Timing several ways of doing one thing, fairly: interleaved round by round (a slow phase
of the machine hits every candidate alike), with a pause before each timed call so that one
engine's worker threads, still spinning or waking from its last call, do not take the CPU
from the next engine's."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

# Measured on 2 cores, ResNet-50 batch 16 int8 in OpenVINO right after ONNX Runtime and
# torch paths: no pause 267-274 img/s, 20 ms 310-336, 200 ms 347-372 (372 timed alone).
# ORT's own threads are also stopped from spinning (backends.onnxruntime.session).
SETTLE_S = 0.1


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                settle: float | None = None, sync: Callable[[], None] | None = None
                ) -> dict[str, list[float]]:
    """Seconds per call of each candidate over `rounds` interleaved rounds, after `warmup`
    untimed calls each; `settle` seconds of sleep before every timed call (None:
    SETTLE_S); `sync` (e.g. torch.cuda.synchronize) is called before the clock stops."""
    settle = SETTLE_S if settle is None else settle
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for k, fn in candidates.items():
            if settle:
                time.sleep(settle)
            t = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times[k].append(time.perf_counter() - t)
    return times


def per_second(times: dict[str, list[float]], items: int) -> dict[str, float]:
    """Items per second of each candidate: `items` over its median time."""
    return {k: items / statistics.median(v) for k, v in times.items()}

"""Timing several ways of doing one thing, fairly: interleaved round by round (a slow phase
of the machine hits every candidate alike), each timed call right after an untimed call of
the same candidate. That lead-in call absorbs what the previous candidate left behind:
worker threads of another engine (or of PyTorch's OpenMP pool) still spinning on the
cores, caches full of another model. Pausing instead does not work: the first call after
an idle spell is itself slow (measured on 2 cores, ResNet-20 bf16 batch 256 timed alone:
22,182 img/s back to back, 18,669 with 0.1 s of sleep before each call, 13,095 with 0.5 s)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

# Measured on 2 cores, ResNet-20 batch 256 at 28x28, resnetkit's compiled bf16 path and
# OpenVINO bf16 interleaved: without a lead-in OpenVINO ran at 19,665 img/s (22,726 alone),
# with one 22,910-23,097 and resnetkit at 21,386-21,490 (21,706-21,888 alone).
LEAD_IN = 1


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                sync: Callable[[], None] | None = None, lead_in: int | None = None
                ) -> dict[str, list[float]]:
    """Seconds per call of each candidate over `rounds` interleaved rounds, after `warmup`
    untimed calls each; `lead_in` untimed calls (None: LEAD_IN) of the same candidate right
    before each timed one; `sync` (e.g. torch.cuda.synchronize) is called before the clock
    starts and before it stops."""
    lead_in = LEAD_IN if lead_in is None else lead_in
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for k, fn in candidates.items():
            for _ in range(lead_in):
                fn()
            if sync is not None:
                sync()
            t = time.perf_counter()
            fn()
            if sync is not None:
                sync()
            times[k].append(time.perf_counter() - t)
    return times


def per_second(times: dict[str, list[float]], items: int) -> dict[str, float]:
    """Items per second of each candidate: `items` over its median time."""
    return {k: items / statistics.median(v) for k, v in times.items()}

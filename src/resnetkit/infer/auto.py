"""engine="auto": the engine measured fastest on this CPU for a model, input shape and
precision, timed once and remembered in a cache file per CPU model."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..model import ResNet
from ..runtime import cpu_info
from .timing import interleaved, per_second

ROUNDS = 5
WARMUP = 3


def cache_file() -> Path:
    """engines.json beside the weights cache ($RESNETKIT_CACHE/.. or ~/.cache/resnetkit)."""
    from ..weights.download import cache_dir
    return cache_dir().parent / "engines.json"


def cache_key(model: ResNet, shape: tuple[int, ...], precision: str) -> str:
    """CPU model, the instruction sets oneDNN may use, threads, architecture, shape,
    precision: what decides which engine is fastest (not the weights' values)."""
    info = cpu_info()
    arch = hashlib.sha256(repr(model.cfg).encode()).hexdigest()[:12]
    isa = hashlib.sha256(" ".join(sorted(info["flags"])).encode()).hexdigest()[:8]
    return (f"{info['name']}|isa {isa}|{torch.get_num_threads()} threads|{arch}|"
            f"{'x'.join(map(str, shape))}|{precision}")


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only means measuring again next time


def measure(candidates: dict[str, Callable[[torch.Tensor], Any]], shape: tuple[int, ...],
            rounds: int = ROUNDS) -> dict[str, float]:
    """img/s of each engine on a random batch: WARMUP calls each (the first compiles; the
    next few still run slower while caches and allocators settle), then `rounds`
    interleaved rounds (see timing.interleaved); medians."""
    x = torch.randn(shape)
    calls = {k: functools.partial(e, x) for k, e in candidates.items()}
    return per_second(interleaved(calls, rounds, WARMUP), shape[0])


def fastest(key: str, engines: list[str], build: Callable[[str], Any],
            shape: tuple[int, ...]) -> Any:
    """build(engine) for the engine of `engines` measured fastest on inputs of `shape`: the
    cached measurement under `key` (see cache_key) where it names one of them, else each
    is built and measured now and the result cached. The runner returned has `.timings`,
    img/s by engine."""
    known = _read_cache().get(key, {})
    if known.get("engine") in engines:
        winner = build(known["engine"])
        winner.timings = known.get("img_s")
        return winner
    candidates = {e: build(e) for e in engines}
    speed = measure(candidates, shape)
    best = max(speed, key=speed.get)
    _write_cache(key, {"engine": best, "img_s": speed, "measured": time.time()})
    winner = candidates[best]
    winner.timings = speed
    return winner

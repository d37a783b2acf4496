"""The model repository under load, for serve_load.py: a new version copied in, a broken
version dropped in, and the new version removed, each in the middle of a closed-loop load;
the requests that failed, and the latency while each change is taken up."""
from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np


def make_repository(model: str, root: Path, name: str = "model") -> Path:
    """root/NAME/1/ holding `model` (a run folder's files or one model file)."""
    version = root / name / "1"
    add_version(Path(model), version)
    return root / name


def add_version(model: Path, version: Path) -> None:
    """Copy `model` into a staging folder, then move it to `version` in one rename, as a
    deployment would (the server also skips a half-copied folder and retries it)."""
    staging = version.parent.parent / f".staging-{version.parent.name}-{version.name}"
    if model.is_dir():
        shutil.copytree(model, staging)
    else:
        staging.mkdir(parents=True)
        shutil.copy2(model, staging / model.name)
    version.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(version)


def versions(url: str, name: str, headers: dict) -> list[str]:
    r = httpx.get(f"{url}/v2/models/{name}", headers=headers, timeout=10)
    return r.json().get("versions", []) if r.status_code == 200 else []


async def under_load(closed_loop, url: str, requests: list, concurrency: int, seconds: float,
                     act, settled, pid: int | None) -> dict:
    """Run `closed_loop` for `seconds`; `act()` (in a thread) a third of the way in, then
    `settled()` polled until true. Reports the load's figures, when the action started and
    settled, and the p99 of the requests sent between the two (and 1 s after)."""
    times: list[tuple[float, float]] = []
    marks: dict[str, float] = {}

    def action() -> None:
        time.sleep(seconds / 3)
        marks["start"] = time.perf_counter()
        act()
        while not settled() and time.perf_counter() - marks["start"] < seconds:
            time.sleep(0.05)
        marks["settled"] = time.perf_counter()
    thread = threading.Thread(target=action)
    t0 = time.perf_counter()
    thread.start()
    load = await closed_loop(url, requests, concurrency, 10**9, seconds, pid, times)
    await asyncio.to_thread(thread.join)
    start, end = marks["start"] - t0, marks.get("settled", time.perf_counter()) - t0
    window = [lat for at, lat in times if start <= at <= end + 1.0]
    return {**load, "action_at_s": start, "settled_after_s": end - start,
            "requests_in_window": len(window),
            "p99_ms_in_window": float(np.percentile(window, 99)) * 1e3 if window else None}


def reload_phases(closed_loop, url: str, requests: list, model: str, repo: Path,
                  concurrency: int, seconds: float, pid: int | None, poll: float) -> dict:
    """A new version (a copy of `model`) during a load, then a broken one, then the new
    one removed (its accepted requests answered, then the default falls back to 1)."""
    name, headers = repo.name, {}
    out = {"new_version": asyncio.run(under_load(
        closed_loop, url, requests, concurrency, seconds,
        lambda: add_version(Path(model), repo / "2"),
        lambda: versions(url, name, headers)[-1:] == ["2"], pid))}

    def broken() -> None:
        (repo / "3").mkdir()
        (repo / "3" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    out["broken_version"] = asyncio.run(under_load(
        closed_loop, url, requests, concurrency, seconds, broken,
        lambda: False, pid))  # never routed: the load runs its course with version 2
    out["broken_version"]["versions_after"] = versions(url, name, headers)
    out["removed_version"] = asyncio.run(under_load(
        closed_loop, url, requests, concurrency, seconds, lambda: shutil.rmtree(repo / "2"),
        lambda: versions(url, name, headers) == ["1"], pid))
    out["poll_seconds"] = poll
    return out

"""The HTTP side's table of models: which load of which version each request goes to.

The inference workers report what they hold (store.py). A version is routed once every
worker reports the same load of it, so a new version takes over atomically: one swap of the
table on the event loop, between two requests. A load that is no longer routed (its version
removed or replaced) stays listed in STATE/held.json until the requests it accepted are
answered; only then may the workers drop it. Each version has its own batcher (one batch is
one model's), all sharing the workers' slots."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..untrusted import shown
from .batcher import Batcher
from .decode import BadInput, Decoder
from .repository import info_path, read_json, write_json
from .logs import logger


@dataclass(eq=False)
class Served:
    """One routed load: its key ("NAME/VERSION/FINGERPRINT"), the metadata its worker wrote
    (classes, preprocess, card, engine...), its decoder and batcher, and the requests it has
    accepted and not yet answered."""

    key: str
    info: dict[str, Any]
    decoder: Decoder
    batcher: Batcher
    inflight: int = 0

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def version(self) -> int:
        return self.info["version"]

    @contextlib.contextmanager
    def accepted(self, n: int = 1):
        """Count `n` requests of this load as in flight for the block's duration."""
        self.inflight += n
        try:
            yield self
        finally:
            self.inflight -= n


@dataclass
class Models:
    """The routing table, refreshed from the workers' reports (`refresh`, cheap: a few small
    files) every `interval_s` by `watch`, and at once while the server is not ready."""

    state_dir: Path
    workers: int
    make_batcher: Callable[[str], Batcher]
    max_pixels: int
    interval_s: float = 1.0
    table: dict[str, dict[int, Served]] = field(default_factory=dict)
    draining: list[Served] = field(default_factory=list)
    held: list[str] | None = None
    ready: bool = False
    task: asyncio.Task | None = None

    def refresh(self) -> None:
        """Route what every worker holds; keep what they still hold of what is routed."""
        reports = [r for r in (read_json(p) for p in self.state_dir.glob("worker-*.json")) if r]
        if len(reports) < self.workers:
            return
        old = {s.key: s for versions in self.table.values() for s in versions.values()}
        agreed = set.intersection(*(set(r["current"].values()) for r in reports))
        still = set.intersection(*(set(r["loaded"]) for r in reports))
        routed: dict[str, str] = {}  # "NAME/VERSION" -> key
        for key in sorted(still & set(old)):  # routed now and held everywhere: kept ...
            routed[key.rsplit("/", 1)[0]] = key
        for key in sorted(agreed):  # ... unless every worker agrees on a newer load
            routed[key.rsplit("/", 1)[0]] = key
        for where in [w for w, k in routed.items() if k not in agreed and
                      not any(w in r["current"] for r in reports)]:
            del routed[where]  # the version's folder is gone: drained below, then dropped
        table: dict[str, dict[int, Served]] = {}
        for key in routed.values():
            served = old.get(key) or self._served(key)
            if served is not None:
                table.setdefault(served.name, {})[served.version] = served
        dropped = [s for k, s in old.items() if k not in routed.values()]
        for s in dropped:
            logger.info("model %s version %d: no longer routed, draining %d requests",
                        s.name, s.version, s.inflight)
        self.draining = [s for s in self.draining + dropped if s.inflight > 0]
        self._write_held(table)
        self.table = table  # the swap: one assignment, between two requests
        self.ready = bool(table) and all(r.get("ready") for r in reports)

    def _served(self, key: str) -> Served | None:
        info = read_json(info_path(self.state_dir, key))
        if info is None:
            logger.warning("no metadata for the load %s", shown(key))
            return None
        decoder = Decoder(info["preprocess"], self.max_pixels)
        return Served(key, info, decoder, self.make_batcher(key))

    def _write_held(self, table: dict[str, dict[int, Served]]) -> None:
        held = sorted({s.key for v in table.values() for s in v.values()}
                      | {s.key for s in self.draining})
        if held != self.held:
            write_json(self.state_dir / "held.json", held)
            self.held = held

    def watch(self) -> None:
        """Start refreshing in the background on this event loop (once)."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s if self.ready else 0.2)
            try:
                self.refresh()
            except Exception:  # a fault of ours: logged, and the next round tries again
                logger.exception("refreshing the model table failed")

    def names(self) -> list[str]:
        return sorted(self.table)

    def find(self, name: str | None, version: str | None = None) -> Served:
        """The routed load of model `name` (None: the first model by name) at `version`
        (None or "": the highest); BadInput 404 for an unknown model or version."""
        if not self.ready:
            self.refresh()
        if name is None:
            if not self.table:
                raise BadInput(503, "the server has no model ready yet; retry shortly")
            name = self.names()[0]
        versions = self.table.get(name)
        if versions is None:
            raise BadInput(404, f"unknown model {shown(repr(name[:80]))}: this server serves "
                                f"{', '.join(self.names()) or 'no model yet'}")
        if not version:
            return versions[max(versions)]
        if not (version.isascii() and version.isdigit() and len(version) <= 10
                and int(version) in versions):
            raise BadInput(404, f"model {name} has no version {shown(repr(version[:20]))} ready: "
                                f"it has {', '.join(str(v) for v in sorted(versions))}")
        return versions[int(version)]

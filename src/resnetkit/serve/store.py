"""The models an inference worker holds: every version of the repository (repository.py),
loaded, warmed and reported, then on each poll the new or changed ones loaded in the
background while the worker serves the others.

The worker tells the HTTP process what it holds through its report file
(STATE/worker-PID.json: "current", the load it would serve for each version on disk, and
"loaded", every load in memory); the HTTP process routes a load once every worker reports
it (routing.py) and lists in STATE/held.json the loads it still routes or waits for. A load
is dropped from memory only once its version's files are gone or changed and the HTTP
process no longer holds it: a removed version answers the requests it accepted first."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..untrusted import shown
from .logs import logger
from .repository import Repository, Version, info_path, read_json, write_json


class ModelStore:
    """Loads of model versions by key ("NAME/VERSION/FINGERPRINT"). `open_model(spec)` gives
    a runner (see api.open_model); `describe(version, runner)` the metadata the HTTP side
    needs (classes, preprocessing, card), written once per load into the state folder."""

    def __init__(self, repo: Repository, state_dir: str, open_model: Callable[[str], Any],
                 describe: Callable[[Version, Any], dict[str, Any]], extra: dict[str, Any]):
        self.repo, self.state_dir = repo, Path(state_dir)
        self.open_model, self.describe, self.extra = open_model, describe, extra
        self.loaded: dict[str, Any] = {}  # key -> runner
        self.current: dict[str, str] = {}  # "NAME/VERSION" -> the key served for it
        self.failed: dict[str, str] = {}  # "NAME/VERSION" -> the fingerprint that failed
        self.lock = threading.Lock()  # loaded/current: read by the serving thread
        self.report = self.state_dir / f"worker-{os.getpid()}.json"

    def get(self, key: str) -> Any:
        """The runner of a load, None if this worker does not hold it."""
        return self.loaded.get(key)

    def refresh(self) -> None:
        """Load what is new on disk, forget what is gone, drop what nobody holds, report."""
        on_disk = {f"{v.name}/{v.version}": v for v in self.repo.scan()}
        for where, v in on_disk.items():
            if v.key in self.loaded or self.failed.get(where) == v.fingerprint:
                if v.key in self.loaded:
                    with self.lock:
                        self.current[where] = v.key
                continue
            runner = self._load(v)
            if runner is None:
                self.failed[where] = v.fingerprint  # tried again when its files change
                continue
            self.failed.pop(where, None)
            with self.lock:
                self.loaded[v.key] = runner
                self.current[where] = v.key
        with self.lock:
            for where in set(self.current) - set(on_disk):
                del self.current[where]
        self._drop_unheld()
        write_json(self.report, {**self.extra, "ready": True, "current": self.current,
                                 "loaded": sorted(self.loaded)})

    def _load(self, v: Version) -> Any:
        """The warmed runner of `v`, with its metadata written; None (logged) if it fails."""
        start = time.perf_counter()
        try:
            runner = self.open_model(v.spec)
            path = info_path(self.state_dir, v.key)
            if not path.exists():  # one description per load, from whichever worker is first
                write_json(path, self.describe(v, runner))
        except UserError as e:
            logger.warning("model %s version %d was not loaded: %s", v.name, v.version, e)
            return None
        except Exception as e:  # a damaged file can fail in any engine's own way
            logger.warning("model %s version %d was not loaded (%s: %s)", v.name, v.version,
                           type(e).__name__, shown(str(e)[:200]))
            return None
        logger.info("model %s version %d loaded in %.1f s", v.name, v.version,
                    time.perf_counter() - start)
        return runner

    def _drop_unheld(self) -> None:
        held = set(read_json(self.state_dir / "held.json") or [])
        serving = set(self.current.values())
        with self.lock:
            for key in [k for k in self.loaded if k not in serving and k not in held]:
                del self.loaded[key]
                logger.info("model %s version %s unloaded", *key.split("/")[:2])

    def poll(self, seconds: float) -> None:
        """Refresh every `seconds` in a daemon thread, for the worker's life."""
        def loop() -> None:
            while True:
                time.sleep(seconds)
                try:
                    self.refresh()
                except Exception:  # a fault of ours: logged, and the next poll tries again
                    logger.exception("the model repository poll failed")
        threading.Thread(target=loop, daemon=True, name="repository-poll").start()

"""The inference worker: LitServe's LitAPI for a ResNet classifier. Images arrive decoded
(uint8 arrays, see decode.py), as a batch gathered on the HTTP side (batcher.py) or as the
requests LitServe's own batching collected; the worker normalises them with the model's own
preprocessing and runs the engine."""
from __future__ import annotations

import gc
import json
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch

from ..evaluate import preprocess
from .engine import open_engine
from .metrics import worker_metrics


def _exit_with_parent(parent: int) -> None:
    """End this worker when the server process is gone, however it went (a SIGKILL
    included): LitServe's workers would otherwise outlive it, holding the model's memory."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class ClassifierAPI(ls.LitAPI):
    """Top-k classes for batches of decoded images. max_batch 1 with batches gathered on the
    HTTP side (the default, see batcher.py), or max_batch > 1 for LitServe's batching."""

    def __init__(self, source: str, engine: str, precision: str, pre: dict[str, Any],
                 classes: list[str], state_dir: str, max_batch: int, batch_timeout_s: float,
                 threads: int = 0, calibration: str | None = None, nice: int = 0):
        with warnings.catch_warnings():  # max_batch 1 with batch/unbatch is meant: batcher.py
            warnings.filterwarnings("ignore", "The LitServer has both batch and unbatch")
            super().__init__(max_batch_size=max_batch, batch_timeout=batch_timeout_s,
                             api_path="/predict")
        self.source, self.engine_choice, self.precision_choice = source, engine, precision
        self.pre, self.classes, self.state_dir, self.threads = pre, classes, state_dir, threads
        self.calibration, self.nice = calibration, nice
        self.parent = os.getpid()

    def setup(self, device: str) -> None:
        _exit_with_parent(self.parent)
        # Ctrl-C reaches the whole process group: the server process drains, then ends the
        # workers; a worker that stopped at once would drop the batch it is running
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.nice:  # the HTTP process first where they share cores (see server.WORKER_NICE)
            os.nice(self.nice)
        if self.threads:
            torch.set_num_threads(self.threads)
        self.model = open_engine(self.source, self.engine_choice, self.precision_choice,
                                 self.threads, self.calibration)
        self.metrics = worker_metrics()
        chans, size = self.pre["in_chans"], self.pre["image_size"]
        self.model(torch.zeros(1, chans, size, size))  # first-call costs before serving
        gc.collect()  # what is loaded stays: out of every later collection (see server.py)
        gc.freeze()
        Path(self.state_dir, f"worker-{os.getpid()}.json").write_text(json.dumps(
            {"engine": self.model.engine, "precision": self.model.precision,
             "threads": torch.get_num_threads()}))

    def decode_request(self, request: dict[str, Any]) -> dict[str, Any]:
        return request  # decoded and checked on the HTTP side

    def batch(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return inputs

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def predict(self, x: list[dict[str, Any]] | dict[str, Any]) -> Any:
        """x: a batch gathered on the HTTP side ({"images", "top_k"}: batcher.py), or, with
        LitServe's own batching, a list of single requests ({"image", "top_k"}; one request
        when max_batch is 1)."""
        t = time.perf_counter()
        if "images" in x:
            images, ks = torch.from_numpy(x["images"]), x["top_k"]
        else:
            items = [x] if isinstance(x, dict) else x
            images = torch.from_numpy(np.stack([r["image"] for r in items]))
            ks = [r["top_k"] for r in items]
        probs = self.model(preprocess(images, self.pre["mean"], self.pre["std"])).softmax(1)
        p, idx = probs.topk(min(max(ks), probs.shape[1]), 1)
        out = [{"top": [{"class": self.classes[j], "index": j, "prob": q}
                        for j, q in zip(ix[:k], pr[:k])], "batch_size": len(ks)}
               for k, pr, ix in zip(ks, p.tolist(), idx.tolist())]
        self.metrics.batch.observe(len(ks))
        self.metrics.images.inc(len(ks))
        self.metrics.compute.observe(time.perf_counter() - t)
        return out[0] if isinstance(x, dict) and "images" not in x else out

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output

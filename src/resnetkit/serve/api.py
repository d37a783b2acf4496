"""The inference worker: LitServe's LitAPI for a ResNet classifier. Images arrive decoded
(uint8 arrays, see decode.py), as a batch gathered on the HTTP side (batcher.py) or as the
requests LitServe's own batching collected; the worker normalises them with the model's own
preprocessing (data.preprocess) and runs the model on the runner infer chooses for it,
under serving's choices (see serving)."""
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

from ..data.preprocess import model_input
from ..infer import RunConfig, Runner, open_runner, open_source
from ..infer.source import kind_of
from ..infer.predict import top_answers
from .heatmap import why
from .metrics import worker_metrics


def serving(engine: str = "auto", precision: str = "auto", calibration: str | None = None,
            threads: int = 0) -> RunConfig:
    """How a server runs its model (see infer.runner.RunConfig): engine "auto" is chosen
    without measuring, so that a worker starts at once (ONNX Runtime for an .onnx file,
    OpenVINO for an .xml IR, torch for a checkpoint; for int8 the first installed of
    OpenVINO (NNCF), ONNX Runtime (QDQ) and torch (PT2E)); the torch engine is not compiled
    at fp32 or bf16 (a server sees every batch size from 1 to --max-batch, and compiling
    each shape costs tens of seconds), but is at int8, where the uncompiled graph is slower
    than fp32."""
    return RunConfig(engine=engine, precision=precision, calibration=calibration,
                     threads=threads, measure=False,
                     compile="auto" if precision == "int8" else False)


def open_model(source: str | Path, engine: str = "auto", precision: str = "auto",
               threads: int = 0, calibration: str | None = None) -> Runner:
    """The served model on its runner (see serving): a callable on a preprocessed float
    NCHW batch giving fp32 logits, with `.engine` and `.precision`, and `.explained`: the
    fp32 torch model with gradients the "why?" heatmaps come from (None for an exported
    file, which has none). The source is read once."""
    config = serving(engine, precision, calibration, threads)
    config.check(kind_of(source), source)  # an engine that cannot run the file: before reading it
    src = open_source(source)
    runner = open_runner(src, config)
    runner.explained = src.model
    return runner


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
        self.model = open_model(self.source, self.engine_choice, self.precision_choice,
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
        when max_batch is 1). A single request with "explain" set (POST /explain) also gets
        the Grad-CAM heatmap of its first class ("why", see heatmap.why)."""
        t = time.perf_counter()
        if "images" in x:
            images, ks, asked = torch.from_numpy(x["images"]), x["top_k"], []
        else:
            items = [x] if isinstance(x, dict) else x
            images = torch.from_numpy(np.stack([r["image"] for r in items]))
            ks = [r["top_k"] for r in items]
            asked = [i for i, r in enumerate(items) if r.get("explain")]
        inputs = model_input(images, self.pre)
        probs = self.model(inputs).softmax(1)
        out = [{"top": top, "batch_size": len(ks)}
               for top in top_answers(probs, ks, self.classes)]
        for i in asked:  # the requests that asked why (POST /explain)
            out[i]["why"] = self._why(images[i].numpy(), inputs[i:i + 1], out[i]["top"][0])
        self.metrics.batch.observe(len(ks))
        self.metrics.images.inc(len(ks))
        self.metrics.compute.observe(time.perf_counter() - t)
        return out[0] if isinstance(x, dict) and "images" not in x else out

    def _why(self, image: np.ndarray, x: torch.Tensor, first: dict[str, Any]) -> dict[str, Any]:
        if self.model.explained is None:  # the HTTP side refuses these first (/metadata)
            return {"error": "this model is an exported file, which has no gradients"}
        return {**why(self.model.explained, image, x, first["index"]), "class": first["class"]}

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output

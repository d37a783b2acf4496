"""The inference worker: LitServe's LitAPI for a ResNet classifier. Images arrive decoded
(uint8 arrays, see decode.py), as a batch gathered on the HTTP side (batcher.py) or as the
requests LitServe's own batching collected; the worker normalises them with the model's own
preprocessing (data.preprocess) and runs the model on the runner infer chooses for it,
under serving's choices (see serving)."""
from __future__ import annotations

import gc
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import litserve as ls
from fastapi import HTTPException
import numpy as np
import torch

from ..data.preprocess import model_input
from ..infer import RunConfig, Runner, open_runner, open_source
from ..infer.source import kind_of
from ..infer.predict import top_answers
from ..weights.checkpoint import config_to_dict
from .heatmap import why
from .metrics import worker_metrics
from .repository import Repository, Version
from .store import ModelStore


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
    info = src.info()
    runner.explained = src.model
    runner.preprocess, runner.classes = info["preprocess"], info["classes"]
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

    def __init__(self, repo: Repository, engine: str, precision: str, state_dir: str,
                 max_batch: int, batch_timeout_s: float, threads: int = 0,
                 calibration: str | None = None, nice: int = 0, poll_s: float = 0.0,
                 card: Callable[[Any, int], dict[str, Any]] | None = None):
        with warnings.catch_warnings():  # max_batch 1 with batch/unbatch is meant: batcher.py
            warnings.filterwarnings("ignore", "The LitServer has both batch and unbatch")
            super().__init__(max_batch_size=max_batch, batch_timeout=batch_timeout_s,
                             api_path="/predict")
        self.repo, self.engine_choice, self.precision_choice = repo, engine, precision
        self.state_dir, self.threads, self.poll_s, self.card = state_dir, threads, poll_s, card
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
        self.metrics = worker_metrics()
        self.store = ModelStore(self.repo, self.state_dir, self._open, self._describe,
                                {"threads": torch.get_num_threads()})
        self.store.refresh()  # every version loaded and warm before the worker reports ready
        gc.collect()  # what is loaded stays: out of every later collection (see server.py)
        gc.freeze()
        if self.poll_s > 0:
            self.store.poll(self.poll_s)

    def _open(self, spec: str) -> Runner:
        """A version's runner, warmed (first-call costs before it serves)."""
        runner = open_model(spec, self.engine_choice, self.precision_choice, self.threads,
                            self.calibration)
        src_pre = runner.preprocess
        chans, size = src_pre["in_chans"], src_pre["image_size"]
        runner(torch.zeros(1, chans, size, size))
        return runner

    def _describe(self, version: Version, runner: Runner) -> dict[str, Any]:
        """What the HTTP side needs of a load: see repository.info_path."""
        model = runner.explained
        arch = config_to_dict(model.cfg) if model is not None else None
        size = runner.preprocess["image_size"]
        return {"name": version.name, "version": version.version, "classes": runner.classes,
                "preprocess": runner.preprocess, "architecture": arch,
                "explain": model is not None, "engine": runner.engine,
                "precision": runner.precision,
                "card": self.card(model.cfg, size) if self.card and model is not None else None}

    def decode_request(self, request: dict[str, Any]) -> dict[str, Any]:
        return request  # decoded and checked on the HTTP side

    def batch(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return inputs

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def predict(self, x: list[dict[str, Any]] | dict[str, Any]) -> Any:
        """x: a batch gathered on the HTTP side ({"model", "images", "top_k"}: batcher.py),
        or, with LitServe's own batching, a list of single requests ({"model", "image",
        "top_k"}; one request when max_batch is 1). "model" is the key of the load to run
        (repository.Version.key); a top_k of 0 asks for the logits (the Open Inference
        Protocol's outputs) instead of the top classes. A single request with "explain" set
        (POST /explain) also gets the Grad-CAM heatmap of its first class ("why")."""
        if "images" in x:
            return self._run(x["model"], torch.from_numpy(x["images"]), x["top_k"])
        items = [x] if isinstance(x, dict) else x
        out: list[Any] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(items):  # one run per model in what LitServe gathered
            groups.setdefault(r["model"], []).append(i)
        for key, idx in groups.items():
            images = torch.from_numpy(np.stack([items[i]["image"] for i in idx]))
            asked = [j for j, i in enumerate(idx) if items[i].get("explain")]
            for i, result in zip(idx, self._run(key, images, [items[i]["top_k"] for i in idx],
                                                asked)):
                out[i] = result
        return out[0] if isinstance(x, dict) else out

    def _run(self, key: str, images: torch.Tensor, ks: list[int],
             asked: list[int] = ()) -> list[dict[str, Any]]:
        t = time.perf_counter()
        runner = self.store.get(key)
        if runner is None:  # the HTTP side routes only loads every worker holds: a bug
            raise HTTPException(503, f"model version {key.rsplit('/', 1)[0]} is not loaded")
        inputs = model_input(images, runner.preprocess)
        logits = runner(inputs).float()
        probs = logits.softmax(1)
        ranked = [i for i, k in enumerate(ks) if k]
        tops = dict(zip(ranked, top_answers(probs[ranked], [ks[i] for i in ranked],
                                            runner.classes))) if ranked else {}
        out = [{"top": tops[i]} if i in tops else {"logits": logits[i].numpy()}
               for i in range(len(ks))]
        for o in out:
            o["batch_size"] = len(ks)
        for i in asked:  # the requests that asked why (POST /explain)
            out[i]["why"] = self._why(runner, images[i].numpy(), inputs[i:i + 1],
                                      out[i]["top"][0])
        self.metrics.batch.observe(len(ks))
        self.metrics.images.inc(len(ks))
        self.metrics.model_images.labels(*key.split("/")[:2]).inc(len(ks))
        self.metrics.compute.observe(time.perf_counter() - t)
        return out

    def _why(self, runner: Runner, image: np.ndarray, x: torch.Tensor,
             first: dict[str, Any]) -> dict[str, Any]:
        if runner.explained is None:  # the HTTP side refuses these first (/metadata)
            return {"error": "this model is an exported file, which has no gradients"}
        return {**why(runner.explained, image, x, first["index"]), "class": first["class"]}

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output

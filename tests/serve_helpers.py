"""A served model for the server tests: a ResNet-20 checkpoint for 1x28x28 images with random
weights, and a `resnetkit serve` process on a free port."""
from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

import resnetkit as rk
from resnetkit.weights.checkpoint import save_weights

CLASSES = [f"class-{i}" for i in range(10)]


def write_checkpoint(path: Path) -> Path:
    """A random-weight ResNet-20 checkpoint with classes and preprocessing in its metadata."""
    torch.manual_seed(0)
    model = rk.create_model("resnet20", in_chans=1, num_classes=10).eval()
    save_weights(path, model, {"classes": CLASSES, "preprocess": {
        "mean": [0.29], "std": [0.35], "image_size": 28, "in_chans": 1}})
    return path


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`resnetkit serve MODEL ARGS...` in a process of its own (its own process group, so a
    test that fails cannot leave it running), ready when /health answers 200."""

    def __init__(self, model: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resnetkit", "serve", str(model), "--port", str(self.port),
             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.close()
        raise RuntimeError("server not ready within 180 s")

    def close(self) -> None:
        import os
        import signal
        try:  # the whole group: whatever the server left behind goes too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

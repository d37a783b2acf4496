"""A served model for the server tests: a ResNet-20 checkpoint for 1x28x28 images with random
weights, a `resnetkit serve` process on a free port, and raw-socket clients for what an HTTP
library will not send (floods of headers, one byte at a time)."""
from __future__ import annotations

import io
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

import resnetkit as rk
from resnetkit.weights.checkpoint import save_weights

CLASSES = [f"class-{i}" for i in range(10)]


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random-weight ResNet-20 checkpoint with classes and preprocessing in its metadata."""
    torch.manual_seed(seed)
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
    test that fails cannot leave it running), ready when /health answers 200. Its output
    goes to a file (`log()`), never to a pipe that nobody reads and that would block it
    once full."""

    def __init__(self, model: Path | None, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "resnetkit", "serve", *([str(model)] if model else []),
             "--port", str(self.port), *args],
            stdout=self.out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.close()
        raise RuntimeError("server not ready within 180 s")

    def log(self) -> str:
        """What the server has written to stdout and stderr so far."""
        with open(self.out.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def close(self) -> None:
        import os
        import signal
        try:  # the whole group: whatever the server left behind goes too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.out.close()


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of the answer on `sock`, read until the server closes (10 s at most);
    status 0 if there was none."""
    data, until = b"", time.monotonic() + 10
    sock.settimeout(10)
    while time.monotonic() < until:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data.partition(b"\r\n\r\n")[2]


def exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send the raw `request` on a connection of its own; the answer (see `answer`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):  # refused while it was sending
            pass
        return answer(sock)


def trickle(port: int, head: bytes, drip: bytes) -> tuple[int, bytes, float]:
    """Send `head`, then `drip` a byte every 0.4 s (a pause far under the server's 30 s
    stall limit) until the server answers or 10 s pass; (status, body, seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(head)
        for i in range(25):
            if select.select([sock], [], [], 0.4)[0]:
                break
            try:
                sock.sendall(drip[i % len(drip):][:1])
            except OSError:
                break
        status, body = answer(sock)
        return status, body, time.monotonic() - start

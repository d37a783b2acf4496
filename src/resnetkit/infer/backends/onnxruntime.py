"""The ONNX Runtime engine: the one place a session is made and run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...errors import UserError
from ...untrusted import shown


def check_nchw(shape: list[Any], source: Any) -> int:
    """The channel count of an input of `shape`, which must be NCHW (batch, channels,
    height, width) with a fixed channel count of at most 4; else UserError."""
    if len(shape) != 4 or not isinstance(shape[1], int) or not 0 < shape[1] <= 4:
        raise UserError(f"{shown(source)} takes input of shape {shown(shape)}; resnetkit "
                        f"expects NCHW (batch, channels, height, width)")
    return shape[1]


def session(model: str | Path | bytes, threads: int = 0, source: Any = None):
    """An ONNX Runtime session on the CPU for a file or the bytes of one (threads: 0 for
    ORT's default); its input layout checked. source: the model's name in messages."""
    source = source or model
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX files need onnxruntime: pip install 'resnetkit[export]'") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unreadable models
        raise UserError(f"cannot load {shown(source)} in ONNX Runtime ({e})") from None
    check_nchw(sess.get_inputs()[0].shape, source)
    return sess


def runs(sess) -> Callable[[np.ndarray], np.ndarray]:
    """The session as a function of a float NCHW array, giving its first output."""
    name = sess.get_inputs()[0].name
    return lambda a: sess.run(None, {name: a})[0]

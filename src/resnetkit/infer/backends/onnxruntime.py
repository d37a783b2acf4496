"""The ONNX Runtime engine: the one place a session is made and run, and ORT's own static
int8 quantizer."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ...errors import UserError
from ...untrusted import shown

# graph optimisation levels, by the names ORT's documentation gives them
LEVELS = ("disable", "basic", "extended", "all")
INT8_FORMATS = ("qdq", "qoperator")


def check_nchw(shape: list[Any], source: Any) -> int:
    """The channel count of an input of `shape`, which must be NCHW (batch, channels,
    height, width) with a fixed channel count of at most 4; else UserError."""
    if len(shape) != 4 or not isinstance(shape[1], int) or not 0 < shape[1] <= 4:
        raise UserError(f"{shown(source)} takes input of shape {shown(shape)}; resnetkit "
                        f"expects NCHW (batch, channels, height, width)")
    return shape[1]


def session(model: str | Path | bytes, threads: int = 0, source: Any = None,
            level: str = "all"):
    """An ONNX Runtime session on the CPU for a file or the bytes of one (threads: 0 for
    ORT's default; level: the graph optimisation level, one of LEVELS); its input layout
    checked. source: the model's name in messages.

    Its worker threads stop spinning when a run returns (`session.force_spinning_stop`):
    left spinning, they took the CPU from whatever ran next in the process. On 2 cores an
    OpenVINO int8 ResNet-50 timed right after an ORT run went from 372 to 274 img/s."""
    source = source or model
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX files need onnxruntime: pip install 'resnetkit[export]'") from None
    if level not in LEVELS:
        raise UserError(f"ONNX Runtime's optimisation level is one of {', '.join(LEVELS)}, "
                        f"not {shown(level)}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    so.add_session_config_entry("session.force_spinning_stop", "1")
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


def quantize_static(fp32: str | Path, out: str | Path, batches: list[np.ndarray],
                    fmt: str = "qdq", per_channel: bool = True) -> None:
    """ONNX Runtime's own post-training static quantization of the fp32 file `fp32` into
    `out`, as its documentation sets it up for CPUs: shape inference and graph cleanup
    first (quant_pre_process), uint8 activations and int8 weights (per channel unless told),
    min-max ranges from `batches` (float NCHW arrays the file's input takes); fmt "qdq"
    (QuantizeLinear/DequantizeLinear pairs) or "qoperator" (QLinearConv and kin)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static as ort_quantize)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    if fmt not in INT8_FORMATS:
        raise UserError(f"ONNX Runtime's int8 format is one of {', '.join(INT8_FORMATS)}, "
                        f"not {shown(fmt)}")
    name = session(fp32).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            b = next(self.left, None)
            return None if b is None else {name: b}

    prepared = Path(out).with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        source = prepared
    except Exception:  # ORT's pre-processing is optional; the quantizer takes the file as is
        source = Path(fp32)
    try:
        ort_quantize(str(source), str(out), Reader(),
                     quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                     per_channel=per_channel, activation_type=QuantType.QUInt8,
                     weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)

"""The OpenVINO engine: one runtime per process, reading a model, compiling it for the CPU
(the one place), and NNCF's post-training int8 quantization."""
from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ...errors import UserError
from ...runtime import has_native_bf16
from ...untrusted import shown

NOT_INSTALLED = "OpenVINO is not installed: pip install 'resnetkit[openvino]'"


@functools.lru_cache(maxsize=1)
def core():
    """One OpenVINO runtime per process: its CPU plugin (thread pools, caches) is
    process-wide state. With a Core per compiled model, an fp32 and a bf16 model compiled
    side by side led to a segmentation fault later in the same process (when a training run
    in it was then interrupted with SIGINT). Raises ImportError without OpenVINO."""
    import openvino as ov
    return ov.Core()


def precisions() -> list[str]:
    """The inference precisions OpenVINO's CPU plugin offers here ("fp32", plus "bf16" where
    the CPU has native bf16 and ONEDNN_MAX_CPU_ISA does not hide it: under such a cap the
    plugin still offers bf16 but cannot build its nodes); empty when OpenVINO is not
    installed."""
    try:
        c = core()
    except ImportError:
        return []
    caps = c.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ["fp32"] + (["bf16"] if "BF16" in caps and has_native_bf16("cpu") else [])


def read(model: str | Path | bytes, source: Any = None):
    """An openvino.Model from an IR (.xml beside its .bin), an ONNX file or an ONNX file's
    bytes. Raises UserError when OpenVINO is missing or cannot read it."""
    try:
        c = core()
    except ImportError:
        raise UserError(NOT_INSTALLED) from None
    try:
        return c.read_model(model if isinstance(model, bytes) else str(model))
    except Exception as e:  # OpenVINO raises its own exception types for unreadable files
        raise UserError(f"cannot load {shown(source or model)} in OpenVINO ({e})") from None


HINTS = ("LATENCY", "THROUGHPUT")
PRESETS = ("performance", "mixed")


def compiled(model, precision: str = "fp32", threads: int = 0,
             shape: tuple[int, ...] | None = None,
             hint: str = "LATENCY") -> Callable[[np.ndarray], np.ndarray]:
    """`model` (an openvino.Model, left as it is) compiled for the CPU, as a function of a
    float NCHW array. precision is the plugin's inference precision ("fp32" or "bf16");
    shape fixes the input shape (static shapes let the plugin plan its memory; None keeps
    the model's own, a dynamic batch); hint: the plugin's PERFORMANCE_HINT (one of HINTS).
    The function's output is OpenVINO's own buffer, reused by the next call."""
    if precision not in ("fp32", "bf16"):
        raise UserError(f"OpenVINO precision must be fp32 or bf16, got {precision!r}")
    if hint not in HINTS:
        raise UserError(f"OpenVINO's performance hint is one of {', '.join(HINTS)}, got "
                        f"{hint!r}")
    if shape is not None:
        model = model.clone()
        model.reshape(list(shape))
    config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16",
              "PERFORMANCE_HINT": hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    request = core().compile_model(model, "CPU", config).create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: x}, share_inputs=True)
        return request.get_output_tensor(0).data
    return run


def nncf_quantize(model, batches: list[torch.Tensor], preset: str = "performance",
                  subset_size: int = 0, fast_bias_correction: bool = True):
    """`model` (an fp32 openvino.Model) quantized by NNCF's post-training quantization
    (per-channel weights, per-tensor activations) on the calibration batches. preset:
    NNCF's "performance" (symmetric activations) or "mixed" (asymmetric activations);
    subset_size: how many of the batches it reads (0: all); fast_bias_correction: NNCF's
    quick bias correction, else its full one. Returns an openvino.Model."""
    if preset not in PRESETS:
        raise UserError(f"NNCF's preset is one of {', '.join(PRESETS)}, got {preset!r}")
    try:
        import nncf
    except ImportError:
        raise UserError("int8 with OpenVINO needs openvino and nncf: pip install "
                        "'resnetkit[openvino,int8]'") from None
    data = nncf.Dataset([b.numpy() for b in batches])
    # NNCF draws progress bars and logs on stdout, which --json keeps for the result
    with contextlib.redirect_stdout(sys.stderr), nncf_to_stderr():
        return nncf.quantize(model, data, subset_size=subset_size or len(batches),  # batches
                             preset=nncf.QuantizationPreset(preset),
                             fast_bias_correction=fast_bias_correction)


@contextlib.contextmanager
def nncf_to_stderr():
    """NNCF's log handlers (bound to stdout when it was imported) write to stderr meanwhile."""
    import logging

    from nncf.common.logging.logger import nncf_logger
    moved = [h for h in nncf_logger.handlers
             if isinstance(h, logging.StreamHandler) and h.stream is sys.__stdout__]
    for h in moved:
        h.setStream(sys.stderr)
    try:
        yield
    finally:
        for h in moved:
            h.setStream(sys.__stdout__)


def save(model, path: str | Path) -> None:
    """Write an IR: PATH (.xml) and its .bin beside it, weights kept in fp32."""
    import openvino as ov
    ov.save_model(model, str(path), compress_to_fp16=False)


def is_int8(model) -> bool:
    """Whether an openvino.Model holds quantized operations (FakeQuantize, as NNCF writes)."""
    return any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())


def rt_strings(model, keys: tuple[str, ...]) -> dict[str, str]:
    """The resnetkit entries of an IR's rt_info (as write_openvino_ir stores them), as text."""
    return {k: model.get_rt_info(["resnetkit", k]).astype(str) for k in keys
            if model.has_rt_info(["resnetkit", k])}


def shapes(model) -> tuple[list[Any], Any]:
    """(the input's shape, with None where dynamic; the output's last dimension or None)."""
    inp = [d.get_length() if d.is_static else None
           for d in model.inputs[0].get_partial_shape()]
    last = model.outputs[0].get_partial_shape()[-1]
    return inp, last.get_length() if last.is_static else None

"""Export to ONNX (checked in ONNX Runtime), TorchScript or a torch.export ExportedProgram,
with a dynamic batch dimension."""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..geometry import check_input_size
from ..model import ResNet
from ..options import parse_overrides
from ..weights.sources import REGISTRY, load_source
from ..zoo import create_model

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
FORMATS = tuple(SUFFIX)


def export(model: ResNet, path: str | Path, fmt: str = "onnx", image_size: int = 224,
           fold: bool = True, meta: dict[str, Any] | None = None) -> Path:
    """Write `model` (fp32, eval, BN folded unless fold=False) to `path` in `fmt`. For ONNX,
    `meta` (classes, preprocess) is stored in the file's metadata_props, so `predict` can
    use the file alone."""
    from .optimize import fold_model
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.parent.exists() or not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    check_input_size(model, image_size)
    m = copy.deepcopy(model).eval()
    if fold:
        fold_model(m)
    x = torch.randn(2, m.cfg.in_chans, image_size, image_size)
    # written beside the target and renamed into place: a failed write (full or read-only
    # disk) leaves no truncated file, and an existing file stays as it was
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        _write(m, x, fmt, str(tmp), meta)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not isinstance(e.__cause__, OSError) \
                and "write" not in str(e).lower():
            raise  # an exporter failure of ours, not the disk's
        reason = getattr(e, "strerror", None) or getattr(e.__cause__, "strerror", None) or e
        raise UserError(f"cannot write {path}: {reason}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write(m: ResNet, x: torch.Tensor, fmt: str, path: str, meta: dict[str, Any] | None) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    if fmt == "onnx":
        prog = torch.onnx.export(m, (x,), dynamo=True, dynamic_shapes={"x": {0: batch}},
                                 input_names=["input"], output_names=["logits"], verbose=False)
        prog.save(path)
        if meta:
            import onnx
            proto = onnx.load(path)
            for k, v in meta.items():
                proto.metadata_props.add(key=k, value=json.dumps(v))
            onnx.save(proto, path)
    elif fmt == "torchscript":
        with torch.no_grad():
            torch.jit.trace(m, x).save(path)
    else:
        torch.export.save(torch.export.export(m, (x,), dynamic_shapes={"x": {0: batch}}), path)


def export_source(source: str | Path, overrides: list[str] | None = None, fmt: str = "onnx",
                  output: str | Path | None = None, image_size: int = 0,
                  fold: bool = True) -> tuple[Path, ResNet, int]:
    """Export a checkpoint (a .safetensors file, a run folder, a registry tag or a foreign
    weights file: its classes and
    preprocessing go along, at its input size unless `image_size` says otherwise) or a preset
    name with "key=value" overrides (at 224 unless told). Returns (path, model, input size)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    meta: dict[str, Any] = {}
    if Path(source).exists() or str(source) in REGISTRY:
        if overrides:
            raise UserError("config overrides apply to a preset name, not to a checkpoint")
        model, info = load_source(source)
        meta = {k: info[k] for k in ("classes", "preprocess") if k in info}
        size = image_size or meta.get("preprocess", {}).get("image_size", 224)
    else:
        model = create_model(str(source), **parse_overrides(overrides)).eval()
        size = image_size or 224
    stem = Path(source).stem if Path(source).exists() else str(source)  # a tag keeps its dots
    out = Path(output) if output else Path(stem + SUFFIX[fmt])
    if out.suffix != SUFFIX[fmt]:  # what `predict` and the engines go by
        raise UserError(f"a {fmt} file should end in {SUFFIX[fmt]}, not {out.name!r}")
    return export(model, out, fmt, size, fold=fold, meta=meta), model, size


def onnx_session(path: str | Path, threads: int = 0):
    """An ONNX Runtime session on the CPU (threads: 0 for ORT's default); checks the file's
    input layout."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX files need onnxruntime: pip install 'resnetkit[export]'") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unreadable models
        raise UserError(f"cannot load {path} in ONNX Runtime ({e})") from None
    shape = sess.get_inputs()[0].shape
    if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] > 4:
        raise UserError(f"{path} takes input of shape {shape}; resnetkit expects NCHW "
                        f"(batch, channels, height, width)")
    return sess


def onnx_meta(sess, source: str = "the ONNX file") -> dict[str, Any]:
    """The classes and preprocessing an exported file carries, validated like a
    checkpoint's metadata (the file is untrusted input)."""
    from ..weights.checkpoint import check_preprocess
    props = sess.get_modelmeta().custom_metadata_map
    try:
        info = {k: json.loads(v) for k, v in props.items() if k in ("classes", "preprocess")}
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: its metadata is not valid JSON ({e})") from None
    outputs = sess.get_outputs()[0].shape[-1]
    classes = info.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(
            isinstance(c, str) for c in classes) or (isinstance(outputs, int) and len(classes) != outputs)):
        raise UserError(f"{source}: its class list does not match its {outputs} outputs")
    if "preprocess" in info:
        chans = sess.get_inputs()[0].shape[1]
        info["preprocess"] = check_preprocess(info["preprocess"], chans, source)
    return info


@functools.lru_cache(maxsize=1)
def _openvino_core():
    """One OpenVINO runtime per process: its CPU plugin (thread pools, caches) is
    process-wide state. With a Core per compiled model, an fp32 and a bf16 model compiled
    side by side led to a segmentation fault later in the same process (when a training run
    in it was then interrupted with SIGINT)."""
    import openvino as ov
    return ov.Core()


def openvino_precisions() -> list[str]:
    """The inference precisions OpenVINO's CPU plugin offers here ("fp32", plus "bf16" where
    the CPU has native bf16); empty when OpenVINO is not installed."""
    try:
        core = _openvino_core()
    except ImportError:
        return []
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ["fp32"] + (["bf16"] if "BF16" in caps else [])


def openvino_model(path: str | Path, precision: str = "fp32", threads: int = 0,
                   shape: tuple[int, ...] | None = None):
    """An exported ONNX file compiled by OpenVINO for the CPU. precision is the plugin's
    inference precision ("fp32" or "bf16"); shape fixes the input shape (static shapes let
    the plugin plan its memory; None keeps the dynamic batch). Call it on a numpy array."""
    try:
        core = _openvino_core()
    except ImportError:
        raise UserError("OpenVINO is not installed: pip install 'resnetkit[openvino]'") from None
    if precision not in ("fp32", "bf16"):
        raise UserError(f"OpenVINO precision must be fp32 or bf16, got {precision!r}")
    try:
        model = core.read_model(str(path))
    except Exception as e:  # OpenVINO raises its own exception types for unreadable files
        raise UserError(f"cannot load {path} in OpenVINO ({e})") from None
    if shape is not None:
        model.reshape(list(shape))
    config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16",
              "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(x):
        request.infer({0: x}, share_inputs=True)
        return request.get_output_tensor(0).data
    return run

"""Export to ONNX (checked in ONNX Runtime), TorchScript or a torch.export ExportedProgram,
with a dynamic batch and, by default, dynamic height and width (the net is fully
convolutional up to its global pool)."""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..geometry import check_input_size
from ..model import ResNet
from ..runtime import check_memory
from ..options import parse_overrides
from ..untrusted import parse_json, shown
from ..weights.checkpoint import atomic_write, default_output
from ..weights.sources import REGISTRY, class_names, load_source, preprocess_of
from ..zoo import create_model, get_config

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
FORMATS = tuple(SUFFIX)


MIN_OPSET = 18  # the lowest the torch.export-based ONNX exporter writes (torch 2.13)


def check_opset(opset: int | None) -> None:
    if opset is None:
        return
    import onnx
    top = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise UserError(f"opset {opset} is not available: choose {MIN_OPSET} to {top} (the "
                        f"exporter writes opset {MIN_OPSET} or later; this onnx knows up to {top})")


def export(model: ResNet, path: str | Path, fmt: str = "onnx", image_size: int = 224,
           fold: bool = True, meta: dict[str, Any] | None = None, dynamic_size: bool = True,
           opset: int | None = None) -> Path:
    """Write `model` (fp32, eval, BN folded unless fold=False) to `path` in `fmt`, traced at
    `image_size`. dynamic_size: the file takes any height and width (ONNX, ExportedProgram;
    a TorchScript file is scripted and takes any size either way); otherwise only
    image_size. opset: the ONNX opset (default: the exporter's). For ONNX, `meta` (classes,
    preprocess) is stored in the file's metadata_props, so `predict` can use the file alone."""
    from .optimize import fold_model
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise UserError(f"--opset applies to ONNX files, not to {fmt}")
    check_opset(opset)
    path = Path(path)
    if not path.parent.exists() or not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")
    check_input_size(model, image_size)
    # the copy below, the exporter's graph and the file's bytes each hold the weights again,
    # and tracing keeps every activation: estimated as a training step's needs, at batch 2
    check_memory(model.cfg, image_size, batch=2, training=True, what=f"exporting {model.cfg.block} "
                 f"ResNet of {sum(p.numel() for p in model.parameters()):,} parameters")
    m = copy.deepcopy(model).eval()
    if fold:
        fold_model(m)
    x = torch.randn(2, m.cfg.in_chans, image_size, image_size)
    # a failed write (full or read-only disk) leaves no truncated file, and an existing
    # file stays as it was
    try:
        atomic_write(path, lambda tmp: _write(m, x, fmt, tmp, meta, dynamic_size, opset))
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not isinstance(e.__cause__, OSError) \
                and "write" not in str(e).lower():
            raise  # an exporter failure of ours, not the disk's
        reason = getattr(e, "strerror", None) or getattr(e.__cause__, "strerror", None) or e
        raise UserError(f"cannot write {path}: {reason}") from None
    return path


def _name_dims(proto, names: dict[int, str]) -> None:
    """Give the input's symbolic dimensions readable names (batch, height, width) everywhere
    in the graph, in place of the exporter's s0, s1, ..."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    rename = {dims[i].dim_param: n for i, n in names.items() if dims[i].dim_param}
    for v in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def _write(m: ResNet, x: torch.Tensor, fmt: str, path: str, meta: dict[str, Any] | None,
           dynamic_size: bool, opset: int | None) -> None:
    # Dim.DYNAMIC: the exporter refines the range itself (an intermediate map of size 1
    # broadcasts differently, so sizes are guarded, not fixed)
    dyn = torch.export.Dim.DYNAMIC
    shapes = {"x": {0: dyn, 2: dyn, 3: dyn} if dynamic_size else {0: dyn}}
    if fmt == "onnx":
        import onnx
        prog = torch.onnx.export(m, (x,), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                 input_names=["input"], output_names=["logits"], verbose=False)
        prog.save(path)
        proto = onnx.load(path)
        written = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        if opset is not None and written != opset:
            raise UserError(f"the exporter wrote opset {written}, not the {opset} asked for")
        _name_dims(proto, {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"})
        for k, v in (meta or {}).items():
            proto.metadata_props.add(key=k, value=json.dumps(v))
        onnx.save(proto, path)
    elif fmt == "torchscript":
        torch.jit.script(m).save(path)
    else:
        torch.export.save(torch.export.export(m, (x,), dynamic_shapes=shapes), path)


def export_source(source: str | Path, overrides: list[str] | None = None, fmt: str = "onnx",
                  output: str | Path | None = None, image_size: int = 0,
                  fold: bool = True, dynamic_size: bool = True,
                  opset: int | None = None) -> tuple[Path, ResNet, int]:
    """Export a checkpoint (a .safetensors file, a run folder, a registry tag or a foreign
    weights file: its classes and preprocessing go along, at its input size unless
    `image_size` says otherwise) or a preset name with "key=value" overrides (at its default
    input size, 224 or 32 for CIFAR nets, unless told; the preset's default preprocessing,
    ImageNet's, and numbered classes go along). Returns (path, model, input size)."""
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
        shape = parse_overrides(overrides)
        # before it is built: the export holds the weights about four times (see export())
        check_memory(get_config(str(source), **shape), training=True, what=f"exporting {source}")
        model = create_model(str(source), **shape).eval()
        size = image_size or model.pretrained_cfg["input_size"][-1]
        meta = {"classes": class_names(model.num_classes),
                "preprocess": preprocess_of(model.pretrained_cfg, size)}
    stem = Path(source).stem if Path(source).exists() else str(source)  # a tag keeps its dots
    out = Path(output) if output else Path(default_output(stem + SUFFIX[fmt]))
    if out.suffix != SUFFIX[fmt]:  # what `predict` and the engines go by
        raise UserError(f"a {fmt} file should end in {SUFFIX[fmt]}, not {out.name!r}")
    return export(model, out, fmt, size, fold=fold, meta=meta, dynamic_size=dynamic_size,
                  opset=opset), model, size


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
    info = {k: parse_json(v, source, f"{k} metadata") for k, v in props.items()
            if k in ("classes", "preprocess")}
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
    the CPU has native bf16 and ONEDNN_MAX_CPU_ISA does not hide it: under such a cap the
    plugin still offers bf16 but cannot build its nodes); empty when OpenVINO is not
    installed."""
    from ..runtime import has_native_bf16
    try:
        core = _openvino_core()
    except ImportError:
        return []
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ["fp32"] + (["bf16"] if "BF16" in caps and has_native_bf16("cpu") else [])


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

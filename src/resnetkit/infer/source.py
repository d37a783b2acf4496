"""Open whatever a model comes from, once: a resnetkit checkpoint or run folder, a registry
tag, a foreign weights file, a preset (random weights, for export), an exported ONNX file or
an OpenVINO IR. Each file is read once and its metadata checked once (infer.meta); what
runs it is chosen later, by infer.runner.open_runner."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


from ..data.preprocess import complete
from ..errors import UserError
from ..model import ResNet
from ..untrusted import regular_file, shown
from ..weights.checkpoint import load_weights_into, read_checkpoint
from ..weights.registry import REGISTRY
from ..weights.sources import class_names, load_source, preprocess_of, pretrained_cfg_of
from .backends import openvino as ov_backend
from .backends.onnxruntime import check_nchw
from .meta import EXPORTED, KEYS, Meta


@dataclass(frozen=True)
class Source:
    """A model as read from its source. meta: classes, preprocessing and provenance; model:
    the ResNet in eval mode (weights and presets; None for an exported file); exported: an
    ONNX file's bytes or an openvino.Model (exported files); precision: the stored model's,
    "int8" for a quantized exported file, else "fp32"; outputs: the number of classes
    (None where an exported file leaves it open)."""

    meta: Meta
    model: ResNet | None = None
    exported: Any = None
    precision: str = "fp32"
    outputs: int | None = None

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def name(self) -> str:
        """The source as given, for messages."""
        return self.meta.source

    @property
    def is_exported(self) -> bool:
        return self.meta.kind in EXPORTED.values()

    @property
    def config(self):
        """The architecture (a ResNetConfig), None for an exported file."""
        return self.model.cfg if self.model is not None else None

    def info(self) -> dict[str, Any]:
        """{"classes" (names, or output numbers), "preprocess", "config"}: what a server
        needs before any worker runs the model. Raises UserError without preprocessing."""
        return {"classes": self.meta.class_names(self.outputs or 0),
                "preprocess": self.meta.need_preprocess(), "config": self.config}

    @classmethod
    def of_model(cls, model: ResNet, preprocess: dict[str, Any] | None = None,
                 classes: list[str] | None = None, name: Any = "the model") -> "Source":
        """A model already in memory (the Python API): its preprocessing (completed with the
        defaults, data.preprocess.complete) and class names as given."""
        pre = complete(preprocess, model.cfg.in_chans) if preprocess else None
        return cls(Meta(classes, pre, str(name), "model"), model, outputs=model.num_classes)


def kind_of(spec: Any) -> str | None:
    """"onnx" or "openvino" for an exported file's name, else None (decided by its suffix,
    before anything is read)."""
    return EXPORTED.get(Path(str(spec)).suffix.lower())


def open_source(spec: str | Path, overrides: list[str] | None = None,
                preset: bool = False) -> Source:
    """The model of `spec`: a .safetensors checkpoint or run folder (its best, else last,
    checkpoint), a registry tag, a foreign weights file (see weights.sources.load_source),
    an .onnx file or an OpenVINO .xml IR; with preset=True also a preset name, built with
    "key=value" `overrides` (random weights; ImageNet's preprocessing and numbered
    classes). Raises UserError for anything that is none of these or fails its checks."""
    path = Path(spec)
    kind = kind_of(spec)
    if overrides and (kind or path.exists() or str(spec) in REGISTRY):
        raise UserError("config overrides apply to a preset name, not to a checkpoint")
    if kind == "onnx":
        return _onnx(path)
    if kind == "openvino":
        return _openvino(path)
    if preset and not (path.exists() or str(spec) in REGISTRY):
        return _preset(str(spec), overrides)
    if not path.exists() and str(spec) in REGISTRY:
        return _loaded(spec, "tag")
    if path.is_dir() or path.suffix == ".safetensors":
        own = _checkpoint(path, spec)
        if own is not None:
            return own
    return _loaded(spec, "foreign")


def _loaded(spec: Any, kind: str) -> Source:
    """A registry tag or a foreign weights file, as weights.sources.load_source reads it."""
    model, info = load_source(spec)
    return Source(Meta(info.get("classes"), info.get("preprocess"), str(spec), kind), model,
                  outputs=model.num_classes)


def _preset(name: str, overrides: list[str] | None) -> Source:
    """A preset with random weights: opened to be exported, whose exporter holds the
    weights about four times, so that much memory is checked before it is built."""
    from ..options import parse_overrides
    from ..runtime import check_memory
    from ..zoo import create_model, get_config
    shape = parse_overrides(overrides)
    check_memory(get_config(name, **shape), training=True, what=f"exporting {name}")
    model = create_model(name, **shape).eval()
    pre = preprocess_of(model.pretrained_cfg, model.pretrained_cfg["input_size"][-1])
    return Source(Meta(class_names(model.num_classes), pre, name, "preset"), model,
                  outputs=model.num_classes)


def _read(path: Path, what: str) -> bytes:
    regular_file(path, what)
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {shown(path)}: {e.strerror or e}") from None


# ---- a resnetkit checkpoint: one read of the file ------------------------------------------

def _checkpoint(path: Path, spec: Any) -> Source | None:
    """A resnetkit checkpoint (or a run folder's best, else last, one), read once by
    weights.checkpoint.read_checkpoint; None for a safetensors file without resnetkit's
    metadata (a foreign file)."""
    got = read_checkpoint(path, foreign=True)
    if got is None:
        return None
    cfg, weights, info = got
    model = ResNet(cfg)
    load_weights_into(model, weights, str(spec))
    pre = info.get("preprocess")
    if pre is not None:
        model.pretrained_cfg = pretrained_cfg_of(model, pre, tag=str(spec))
    return Source(Meta(info.get("classes"), pre, str(spec), "checkpoint"), model.eval(),
                  outputs=model.num_classes)


# ---- exported files ------------------------------------------------------------------------

def _dims(value_info) -> list[Any]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in value_info.type.tensor_type.shape.dim]


def _onnx(path: Path) -> Source:
    """An .onnx file: its bytes (what the engines load), its metadata and whether it is int8
    (QuantizeLinear nodes, as `resnetkit quantize` writes), from one read."""
    data = _read(path, "model file")
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX files need onnx: pip install 'resnetkit[export]'") from None
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf's own exception types for a damaged file
        raise UserError(f"cannot load {shown(path)} as an ONNX model ({shown(e)})") from None
    graph = proto.graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    if not inputs or not graph.output:
        raise UserError(f"{shown(path)} is not an ONNX model of an image classifier (it has "
                        f"no input or no output)")
    chans = check_nchw(_dims(inputs[0]), path)
    last = (_dims(graph.output[0]) or [None])[-1]
    outputs = last if isinstance(last, int) and last > 0 else None
    props = {p.key: p.value for p in proto.metadata_props}
    int8 = any(n.op_type == "QuantizeLinear" for n in graph.node)
    return Source(Meta.from_strings(props, outputs, chans, path, "onnx"), exported=data,
                  precision="int8" if int8 else "fp32", outputs=outputs)


def _openvino(path: Path) -> Source:
    """An OpenVINO IR (NAME.xml beside NAME.bin): the model, read once, with its metadata
    (see infer.int8_files.write_openvino_ir) and whether it is int8."""
    regular_file(path, "model file")
    model = ov_backend.read(path, path)
    shape, outputs = ov_backend.shapes(model)
    chans = check_nchw(shape, path)
    meta = Meta.from_strings(ov_backend.rt_strings(model, KEYS), outputs, chans, path,
                             "openvino")
    return Source(meta, exported=model, precision="int8" if ov_backend.is_int8(model)
                  else "fp32", outputs=outputs)

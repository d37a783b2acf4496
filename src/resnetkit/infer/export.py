"""Export to ONNX (checked in ONNX Runtime), TorchScript or a torch.export ExportedProgram,
with a dynamic batch and, by default, dynamic height and width (the net is fully
convolutional up to its global pool)."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..geometry import check_input_size
from ..model import ResNet
from ..runtime import check_memory
from ..untrusted import shown
from ..weights.checkpoint import atomic_write, default_output
from ..weights.sources import preprocess_of
from .backends.torch import fold_model
from .source import open_source

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
FORMATS = tuple(SUFFIX)
# ONNX exporters: torch.export's (the default), or the TorchScript tracer it replaced
EXPORTERS = ("dynamo", "torchscript")


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
           opset: int | None = None, batch: int = 0, exporter: str = "dynamo") -> Path:
    """Write `model` (fp32, eval, BN folded unless fold=False) to `path` in `fmt`, traced at
    `image_size`. dynamic_size: the file takes any height and width (ONNX, ExportedProgram;
    a TorchScript file is scripted and takes any size either way); otherwise only
    image_size. batch: 0 for any batch size, else the file takes only that many images
    (ONNX). opset: the ONNX opset (default: the exporter's). exporter: for ONNX, "dynamo"
    (torch.export's) or "torchscript" (the tracing exporter before it). For ONNX, `meta`
    (classes, preprocess) is stored in the file's metadata_props, so `predict` can use the
    file alone."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if exporter not in EXPORTERS:
        raise UserError(f"unknown ONNX exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if batch and (fmt != "onnx" or dynamic_size):
        raise UserError("a fixed batch size is for ONNX files of a fixed image size")
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
    x = torch.randn(batch or 2, m.cfg.in_chans, image_size, image_size)
    # a failed write (full or read-only disk) leaves no truncated file, and an existing
    # file stays as it was
    try:
        atomic_write(path, lambda tmp: _write(m, x, fmt, tmp, meta, dynamic_size, opset,
                                              batch == 0, exporter))
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
           dynamic_size: bool, opset: int | None, dynamic_batch: bool = True,
           exporter: str = "dynamo") -> None:
    # Dim.DYNAMIC: the exporter refines the range itself (an intermediate map of size 1
    # broadcasts differently, so sizes are guarded, not fixed)
    dyn = torch.export.Dim.DYNAMIC
    dims = ({0: dyn} if dynamic_batch else {}) | ({2: dyn, 3: dyn} if dynamic_size else {})
    shapes = {"x": dims}
    if fmt == "onnx":
        import onnx
        if exporter == "torchscript":
            names = {0: "batch", 2: "height", 3: "width"}
            torch.onnx.export(m, (x,), path, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {i: names[i] for i in dims}} if dims else None)
        else:
            prog = torch.onnx.export(m, (x,), dynamo=True, dynamic_shapes=shapes or None,
                                     opset_version=opset, input_names=["input"],
                                     output_names=["logits"], verbose=False)
            prog.save(path)
        proto = onnx.load(path)
        written = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        if opset is not None and written != opset:
            raise UserError(f"the exporter wrote opset {written}, not the {opset} asked for")
        _name_dims(proto, {i: {0: "batch", 2: "height", 3: "width"}[i] for i in dims})
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
    src = open_source(source, overrides, preset=True)
    if src.model is None:
        raise UserError(f"{shown(source)} is an exported file already; export the checkpoint "
                        f"it came from")
    model, meta = src.model, src.meta.entries()
    size = image_size or (meta["preprocess"]["image_size"] if "preprocess" in meta else 224)
    if src.kind == "preset" and image_size:  # the preset's preprocessing at the size asked
        meta["preprocess"] = preprocess_of(model.pretrained_cfg, size)
    stem = Path(source).stem if Path(source).exists() else str(source)  # a tag keeps its dots
    out = Path(output) if output else Path(default_output(stem + SUFFIX[fmt]))
    if out.suffix != SUFFIX[fmt]:  # what `predict` and the engines go by
        raise UserError(f"a {fmt} file should end in {SUFFIX[fmt]}, not {out.name!r}")
    return export(model, out, fmt, size, fold=fold, meta=meta, dynamic_size=dynamic_size,
                  opset=opset), model, size

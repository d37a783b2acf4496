"""int8 files: a QDQ ONNX file exported from the PT2E graph (the same scales and zero points
as the torch engine's int8 model; checked in ONNX Runtime against that graph before it is
put in place) and an OpenVINO IR quantized by NNCF on the same calibration images."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..model import ResNet
from ..untrusted import shown
from ..weights.registry import REGISTRY
from .backends import onnxruntime as ort_backend
from .backends import openvino as ov_backend
from .calibrate import calibration_set, check_calibration_outputs
from .export import export
from .quantize import quantize_graph
from .source import open_source

# the exported file against the PT2E graph on the first calibration images: the two round
# at quantization steps independently, so a few values move by one step (about 1% of the
# logits' range); a wrong export differs by far more
MIN_AGREEMENT = 0.95
MAX_DIFF_FRACTION = 0.1


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def _tmp_ir(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.partial.xml")  # OpenVINO wants .xml


def _check_folder(path: Path) -> None:
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist")


def write_qdq_onnx(graph: torch.fx.GraphModule, path: str | Path, example: torch.Tensor,
                   meta: dict[str, Any] | None = None) -> dict[str, float]:
    """Export a converted PT2E graph as QDQ ONNX (QuantizeLinear/DequantizeLinear around
    float Conv/Gemm, dynamic batch), check it in ONNX Runtime against the graph on `example`
    and move it into place. Returns the check: {"agreement", "max_abs_diff",
    "logit_scale"}. Nothing is left at `path` when any step fails."""
    path = Path(path)
    _check_folder(path)
    tmp = _tmp(path)
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        prog = torch.onnx.export(graph, (example[:2],), dynamo=True,
                                 dynamic_shapes={"x": {0: batch}}, input_names=["input"],
                                 output_names=["logits"], verbose=False)
        prog.save(str(tmp))
        if meta:
            import onnx
            proto = onnx.load(str(tmp))
            for k, v in meta.items():
                proto.metadata_props.add(key=k, value=json.dumps(v))
            onnx.save(proto, str(tmp))
        check = compare_onnx(graph, tmp, example)
        if check["agreement"] < MIN_AGREEMENT or \
                check["max_abs_diff"] > MAX_DIFF_FRACTION * check["logit_scale"]:
            raise RuntimeError(f"the int8 ONNX file disagrees with the quantized PyTorch "
                               f"model: {check}")
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return check


def compare_onnx(graph: torch.fx.GraphModule, path: str | Path,
                 x: torch.Tensor) -> dict[str, float]:
    """The ONNX file's logits in ONNX Runtime against the graph's on a batch."""
    got = torch.from_numpy(ort_backend.runs(ort_backend.session(path))(x.numpy()))
    with torch.no_grad():
        ref = graph(x).float()
    return {"agreement": (got.argmax(1) == ref.argmax(1)).float().mean().item(),
            "max_abs_diff": (got - ref).abs().max().item(),
            "logit_scale": ref.abs().max().item(), "images": len(x)}


def write_openvino_ir(model: ResNet, batches: list[torch.Tensor], path: str | Path,
                      meta: dict[str, Any] | None = None) -> Path:
    """An int8 OpenVINO IR (PATH.xml and PATH.bin) quantized by NNCF, the classes and
    preprocessing in its rt_info; both files are written beside the target and renamed into
    place."""
    path = Path(path)
    if path.suffix != ".xml":
        raise UserError(f"an OpenVINO IR is named NAME.xml (with NAME.bin), not {path.name!r}")
    _check_folder(path)
    work = Path(tempfile.mkdtemp())
    try:
        export(model, work / "fp32.onnx", "onnx", batches[0].shape[-1], dynamic_size=False)
        q = ov_backend.nncf_quantize(ov_backend.read(work / "fp32.onnx"), batches)
        for k, v in (meta or {}).items():
            q.set_rt_info(json.dumps(v), ["resnetkit", k])
        tmp = _tmp_ir(path)
        ov_backend.save(q, tmp)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for t in (_tmp_ir(path), _tmp_ir(path).with_suffix(".bin")):
            t.unlink(missing_ok=True)
    return path


def quantize_source(source: str | Path, calibration: str, output: str | Path,
                    data_dir: str | None = None, openvino: str = "auto") -> dict[str, Any]:
    """`resnetkit quantize` and `export --precision int8`: a checkpoint (file, run folder or
    tag) quantized on `calibration` (a dataset spec, ":N" images of its training split, in
    the checkpoint's own preprocessing). output NAME.onnx writes the QDQ ONNX file and, with
    openvino="auto" where OpenVINO and NNCF are installed, NAME.xml/.bin beside it; NAME.xml
    writes only the IR. Returns {"onnx", "openvino", "check", "images"}."""
    out = Path(output)
    if out.suffix not in (".onnx", ".xml"):
        raise UserError(f"the int8 output is NAME.onnx (QDQ ONNX) or NAME.xml (OpenVINO IR), "
                        f"not {out.name!r}")
    _check_folder(out)
    if not (Path(source).exists() or str(source) in REGISTRY):
        raise UserError(f"{source} is not a checkpoint: int8 calibrates with a trained "
                        f"checkpoint's own preprocessing (a .safetensors file, a run folder "
                        f"or a weights tag)")
    src = open_source(source)
    if src.model is None:
        raise UserError(f"{shown(source)} is an exported file; int8 calibrates the checkpoint "
                        f"it was exported from")
    model, meta = src.model, src.meta.entries()
    batches = calibration_set(calibration, model.cfg.in_chans,
                              preprocess=src.meta.preprocess, data_dir=data_dir,
                              classes=src.meta.classes)
    result: dict[str, Any] = {"images": sum(len(b) for b in batches), "onnx": None,
                              "openvino": None}
    ir = out if out.suffix == ".xml" else out.with_suffix(".xml")
    if out.suffix == ".onnx":
        graph = quantize_graph(model, batches, source)  # checks the model's outputs
        example = torch.cat(batches)[:256]
        result["check"] = write_qdq_onnx(graph, out, example, meta)
        result["onnx"] = str(out)
        if openvino == "auto":
            try:
                import nncf  # noqa: F401
                import openvino as ov  # noqa: F401
            except ImportError:
                return result
    else:
        check_calibration_outputs(model, batches, source)
    result["openvino"] = str(write_openvino_ir(model, batches, ir, meta))
    return result

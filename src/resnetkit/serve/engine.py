"""What a served model runs on: its classes and preprocessing (read once by the HTTP side)
and the engine that computes its logits (opened in each inference worker).

`open_engine` is the one place the engine is chosen; it returns a callable on a
preprocessed float NCHW batch giving fp32 logits, with `.engine` and `.precision`, the shape
`infer.optimize` is to give for every engine, so that the choice can move there whole."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..infer.engines import Engine
from ..weights.sources import load_source

ENGINES = ("auto", "torch", "onnxruntime", "openvino")


def is_onnx(source: str | Path) -> bool:
    return str(source).lower().endswith(".onnx")


def model_info(source: str | Path) -> dict[str, Any]:
    """{"classes", "preprocess", "config" (a ResNetConfig, None for an ONNX file)} of a run
    folder, checkpoint, registry tag, foreign weights file or exported ONNX file. Raises
    UserError when the source cannot be read or carries no preprocessing."""
    if is_onnx(source):
        from ..infer.export import onnx_meta, onnx_session
        if not Path(source).is_file():
            raise UserError(f"no ONNX file at {source}")
        sess = onnx_session(source)
        info = onnx_meta(sess, str(source))
        if "preprocess" not in info:
            raise UserError(f"{source} has no preprocessing metadata; export it from a trained "
                            f"checkpoint with `resnetkit export RUN_DIR`")
        outputs = sess.get_outputs()[0].shape[-1]
        classes = info.get("classes") or [str(i) for i in range(outputs)]
        return {"classes": classes, "preprocess": info["preprocess"], "config": None}
    model, info = load_source(source)
    classes = info.get("classes") or [str(i) for i in range(model.cfg.num_classes)]
    pre = info.get("preprocess")
    if pre is None:
        raise UserError(f"{source} carries no preprocessing (mean, std, image size); convert "
                        f"it with `resnetkit weights convert` or serve a run folder")
    return {"classes": classes, "preprocess": pre, "config": model.cfg}


def int8_calibration(source: str | Path, calibration: str | None, data_dir: str | None = None
                     ) -> tuple[Any, dict[str, Any], list[torch.Tensor]]:
    """(model, info, calibration batches) for serving `source` in int8: the checkpoint as
    load_source gives it, and `calibration` (a dataset spec such as fashion-mnist:512) read
    with its preprocessing and classes. Raises
    UserError for an ONNX file, a missing or bad spec (see infer.quantize.calibration_set)."""
    if is_onnx(source):
        raise UserError("an ONNX file is served as it was exported; for int8 serve the "
                        "checkpoint with --precision int8 --calibration DATASET, or an int8 "
                        "file written by `resnetkit quantize`")
    if not calibration:
        raise UserError("--precision int8 needs --calibration: a dataset of the model's "
                        "training images, e.g. --calibration fashion-mnist:512")
    from ..infer.quantize import calibration_set
    model, info = load_source(source)
    return model, info, calibration_set(calibration, model.cfg.in_chans,
                                        preprocess=info.get("preprocess"), data_dir=data_dir,
                                        classes=info.get("classes"))


def int8_engine(engine: str) -> str:
    """The engine that serves int8: `engine`, or for "auto" the first installed of OpenVINO
    (NNCF), ONNX Runtime (QDQ) and torch (PT2E). Raises UserError where it is not installed."""
    from ..infer.engines import installed
    if engine == "auto":
        engine = next((e for e in ("openvino", "onnxruntime", "torch")
                       if not installed(e, "int8")), "torch")
    why = installed(engine, "int8")
    if why:
        raise UserError(why)
    return engine


def open_engine(source: str | Path, engine: str = "auto", precision: str = "auto",
                threads: int = 0, calibration: str | None = None,
                data_dir: str | None = None) -> Engine:
    """The served model on its engine. engine: "auto" (ONNX Runtime for an ONNX file, else
    torch), "torch" (infer.optimize: BN folded, bf16 where the CPU has native bf16, not
    compiled: a server sees every batch size from 1 to --max-batch, and compiling each
    shape costs tens of seconds), "onnxruntime" or "openvino" (a checkpoint is exported to
    ONNX at its input size first, by infer.engines.build). precision: "auto", "fp32"
    or "bf16" (torch and OpenVINO), or "int8" for a checkpoint, calibrated on `calibration`
    (see int8_calibration); engine "auto" then takes the first installed of OpenVINO
    (NNCF), ONNX Runtime (QDQ) and torch (PT2E, compiled per batch size: slow to start)."""
    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if precision not in ("auto", "fp32", "bf16", "int8"):
        raise UserError(f"precision must be auto, fp32, bf16 or int8, got {precision!r}")
    if precision == "int8":
        from ..infer.engines import build
        engine = int8_engine(engine)
        model, info, batches = int8_calibration(source, calibration, data_dir)
        size = info["preprocess"]["image_size"]
        return build(model, engine, "int8", batches, shape=(1, model.cfg.in_chans, size, size))
    onnx = is_onnx(source)
    if engine == "auto":
        engine = "onnxruntime" if onnx else "torch"
    if engine == "torch":
        if onnx:
            raise UserError("an ONNX file runs on onnxruntime or openvino, not torch; serve "
                            "the checkpoint it was exported from to use torch")
        from ..infer.optimize import optimize
        model, _ = load_source(source)
        fast = optimize(model, precision=precision, compile=False)
        return Engine("torch", fast.precision, fast, numpy_io=False)
    if onnx:
        from ..infer.engines import is_qdq_onnx, open_file
        if is_qdq_onnx(source):  # int8, from `resnetkit quantize`: it runs as written
            if precision != "auto":
                raise UserError(f"{source} is an int8 (QDQ) file: serve it with --precision "
                                f"auto")
            return open_file(source, engine)[0]
    if engine == "onnxruntime" and precision == "bf16":
        raise UserError("ONNX Runtime serves fp32 here; use --engine openvino for bf16")
    from ..infer.export import openvino_precisions
    if engine == "openvino":
        offered = openvino_precisions()
        if not offered:
            raise UserError("OpenVINO is not installed: pip install 'resnetkit[openvino]'")
        if precision == "auto":
            precision = "bf16" if "bf16" in offered else "fp32"
        elif precision not in offered:
            raise UserError(f"OpenVINO offers {', '.join(offered)} on this CPU, not {precision}")
    else:
        precision = "fp32"
    if onnx:
        from ..infer.export import onnx_session, openvino_model
        if engine == "onnxruntime":
            sess = onnx_session(source, threads)
            name = sess.get_inputs()[0].name
            return Engine("onnxruntime", "fp32", lambda a: sess.run(None, {name: a})[0])
        return Engine("openvino", precision, openvino_model(source, precision, threads))
    # a checkpoint: exported to ONNX at its own input size for the engine (infer.engines)
    from ..infer.engines import build
    model, info = load_source(source)
    pre = info["preprocess"]
    return build(model, engine, precision,
                 shape=(1, pre.get("in_chans", model.cfg.in_chans), pre["image_size"],
                        pre["image_size"]))

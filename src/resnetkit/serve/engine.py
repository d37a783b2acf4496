"""What a served model runs on: its classes and preprocessing (read once by the HTTP side)
and the engine that computes its logits (opened in each inference worker).

`open_engine` is the one place the engine is chosen; it returns a callable on a
preprocessed float NCHW batch giving fp32 logits, with `.engine` and `.precision`, the shape
`infer.optimize` is to give for every engine, so that the choice can move there whole."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from ..weights.sources import load_source

ENGINES = ("auto", "torch", "onnxruntime", "openvino")


class Engine:
    """A callable on a preprocessed float NCHW batch giving fp32 logits."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], engine: str, precision: str):
        self.run, self.engine, self.precision = run, engine, precision

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.run(x).float()


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


def open_engine(source: str | Path, engine: str = "auto", precision: str = "auto",
                threads: int = 0, workdir: str | Path | None = None) -> Engine:
    """The served model on its engine. engine: "auto" (ONNX Runtime for an ONNX file, else
    torch), "torch" (infer.optimize: BN folded, bf16 where the CPU has native bf16, not
    compiled: a server sees every batch size from 1 to --max-batch, and compiling each
    shape costs tens of seconds), "onnxruntime" or "openvino" (a checkpoint is exported to
    ONNX first, into `workdir`, default a new temporary folder). precision: "auto", "fp32"
    or "bf16" (torch and OpenVINO)."""
    if engine not in ENGINES:
        raise UserError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"precision must be auto, fp32 or bf16, got {precision!r}")
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
        return Engine(fast, "torch", fast.precision)
    from ..infer.export import export_source, onnx_session, openvino_model, openvino_precisions
    path = Path(source)
    if not onnx:  # the engines read ONNX: export the checkpoint (its preprocessing goes along)
        folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="resnetkit-serve-"))
        path = folder / f"model-{os.getpid()}.onnx"
        export_source(source, output=path)
    if engine == "onnxruntime":
        if precision == "bf16":
            raise UserError("ONNX Runtime serves fp32 here; use --engine openvino for bf16")
        sess = onnx_session(path, threads)
        name = sess.get_inputs()[0].name
        return Engine(lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0]),
                      "onnxruntime", "fp32")
    offered = openvino_precisions()
    if not offered:
        raise UserError("OpenVINO is not installed: pip install 'resnetkit[openvino]'")
    if precision == "auto":
        precision = "bf16" if "bf16" in offered else "fp32"
    elif precision not in offered:
        raise UserError(f"OpenVINO offers {', '.join(offered)} on this CPU, not {precision}")
    run = openvino_model(path, precision, threads)
    return Engine(lambda x: torch.from_numpy(run(x.contiguous().numpy()).copy()),
                  "openvino", precision)

"""The one place where an engine and a precision are chosen for a model, and the one shape
every engine is run in: a Runner maps a preprocessed float NCHW batch to fp32 logits, and
says what runs (`.engine`, `.precision`) and what the model knows (`.meta`).

predict, eval, bench, quantize's checks, optimize() and the server's workers all open their
model with open_runner(source, RunConfig(...)); only the choices differ (see RunConfig)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import UserError
from ..model import ResNet
from ..runtime import decide_precision, has_native_bf16
from ..untrusted import shown
from . import auto
from .backends import onednn as direct_backend
from .backends import onnxruntime as ort_backend
from .backends import openvino as ov_backend
from .backends.torch import Int8Model, compile_pays, optimized
from .calibrate import CALIBRATION_BATCH, calibration_set, check_calibration_outputs
from .export import export
from .int8_files import write_qdq_onnx
from .meta import EXPORTED, Meta
from .quantize import quantize_graph
from .source import Source, kind_of, open_source

ENGINES = ("torch", "onnxruntime", "openvino")
PRECISIONS = {"torch": ("fp32", "bf16", "int8"), "onnxruntime": ("fp32", "int8"),
              "openvino": ("fp32", "bf16", "int8")}
# engine "auto" without measuring: the first of these installed (int8), else torch
PREFERRED = {"int8": ("openvino", "onnxruntime", "torch")}


@dataclass(frozen=True)
class RunConfig:
    """How a model is to run. engine: "auto", "torch", "onnxruntime" or "openvino" (for an
    exported file, auto is the engine that runs it: ONNX Runtime for .onnx, OpenVINO for
    .xml). precision: "auto" (bf16 where the device runs it natively and the engine has a
    bf16 path, else fp32; an exported file's own precision), "fp32", "bf16" or "int8".
    calibration: int8's images (see calibrate.calibration_set), calibration_batches limits
    them to that many batches of 32 (0: all, or 512 images of a dataset), read from
    data_dir. shape: the input shape (the exported files' size; with static, OpenVINO's
    fixed input; with engine auto, measure now). threads: ONNX Runtime's and OpenVINO's
    (0: torch's). measure: engine auto times the engines and takes the fastest (cached per
    CPU); False takes the first installed (int8: OpenVINO, ONNX Runtime, torch; else torch)
    and starts at once, as a server should. reference: the model as it is, eager fp32 with
    its BNs: what every fast path is judged against. compile, channels_last, fold,
    bf16_weights: the torch engine's (see infer.optimize.optimize). direct: the torch
    engine's direct oneDNN path (backends.onednn: no framework between the convs, no
    compiling): "auto" takes it on the CPU where it is installed and runs the model, unless
    compile=True (Inductor), compile=False at int8 (PT2E's reference graph), fold=False,
    channels_last=False or bf16_weights=True ask for the PyTorch path; True requires it
    (and refuses those options); False never takes it."""

    engine: str = "auto"
    precision: str = "auto"
    calibration: Any = None
    calibration_batches: int = 0
    data_dir: str | None = None
    shape: tuple[int, ...] | None = None
    static: bool = False
    threads: int = 0
    measure: bool = True
    reference: bool = False
    compile: bool | str = "auto"
    channels_last: bool | str = "auto"
    fold: bool = True
    bf16_weights: bool = False
    direct: bool | str = "auto"

    def __post_init__(self) -> None:
        if self.engine not in ("auto", *ENGINES):
            raise UserError(f"engine must be one of auto, {', '.join(ENGINES)}, got "
                            f"{shown(repr(self.engine))}")
        if self.compile not in ("auto", True, False):
            raise UserError(f"compile must be auto, True or False, got {shown(repr(self.compile))}")
        if self.direct not in ("auto", True, False):
            raise UserError(f"direct must be auto, True or False, got {shown(repr(self.direct))}")
        if self.calibration_batches < 0:
            raise UserError(f"calibration_batches must be >= 0, got {self.calibration_batches}")
        if self.calibration is not None and self.precision != "int8":
            raise UserError("calibration images are for precision int8 only")
        if self.reference and (self.engine not in ("auto", "torch") or
                               self.precision not in ("auto", "fp32")):
            raise UserError("the reference is the model as it is: torch, fp32")

    def check(self, kind: str | None, name: Any) -> None:
        """What a source of `kind` (see source.kind_of) refuses before it is read: an
        exported file's engine and calibration."""
        if kind not in EXPORTED.values():
            return
        runs = "onnxruntime or openvino" if kind == "onnx" else "openvino"
        if self.engine == "torch" or (self.engine == "onnxruntime" and kind == "openvino"):
            raise UserError(f"{shown(Path(str(name)).name)} runs in {runs}, not {self.engine}: "
                            f"the torch engine takes the checkpoint it was exported from")
        if self.calibration is not None:
            raise UserError(f"{shown(Path(str(name)).name)} is an exported model, used and "
                            f"served as it was exported: calibration is for a checkpoint "
                            f"(int8 from one, or an int8 file written by `resnetkit quantize`)")


class Runner:
    """A model on an engine: call it on a float NCHW tensor, get fp32 logits (a tensor).
    engine, precision: what runs; meta: the model's classes, preprocessing and source;
    module: the torch module that runs (torch engine), else None; timings: the img/s of
    every engine when engine "auto" measured them (else None)."""

    def __init__(self, engine: str, precision: str, run: Callable[[Any], Any] | None,
                 meta: Meta | None = None, numpy_io: bool = True, module: Any = None):
        self.engine, self.precision, self.meta, self.module = engine, precision, meta, module
        self._run, self._numpy = run, numpy_io
        self.timings: dict[str, float] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._numpy:
            with torch.no_grad():
                return self._run(x).float()
        # copied: OpenVINO hands back its own output buffer, reused by the next call
        return torch.from_numpy(np.array(self._run(x.detach().float().contiguous().numpy())))

    def __repr__(self) -> str:
        return f"Runner({self.engine}, {self.precision})"


def installed(engine: str, precision: str) -> str | None:
    """None when `engine` can run `precision` here, else the sentence saying why not."""
    why = _offered(engine, precision)
    if why:
        return why
    need = {"torch": ["torchao"] if precision == "int8" else [],
            "onnxruntime": ["onnxruntime", "onnx", "onnxscript"],
            "openvino": ["openvino", "onnx", "onnxscript"] + (["nncf"] if precision == "int8" else [])}
    extra = {"torchao": "int8", "nncf": "int8", "openvino": "openvino"}
    for module in need[engine]:
        try:
            __import__(module)
        except ImportError:
            return (f"{precision} with {engine} needs {module}, which is not installed: pip "
                    f"install 'resnetkit[{extra.get(module, 'export')}]'")
    return None


def _offered(engine: str, precision: str) -> str | None:
    if precision not in PRECISIONS[engine]:
        return (f"{engine} has no {precision} path on the CPU; use "
                f"{' or '.join(PRECISIONS[engine])}")
    if engine == "openvino" and precision == "bf16" and "bf16" not in ov_backend.precisions():
        return "OpenVINO offers bf16 only on CPUs with native bf16 (AVX512-BF16 or AMX)"
    return None


def resolve_precision(engine: str, precision: str, device: torch.device | str = "cpu") -> str:
    """`precision`, with "auto" resolved for `engine`: bf16 where the device runs it natively
    and the engine has a bf16 path here (see installed), else fp32; never int8, which needs
    calibration images. For engine "auto" the engines are then chosen among those that run
    that precision."""
    if precision != "auto":
        return precision
    p = decide_precision("auto", device, choices=("bf16", "fp32"))
    if p == "bf16" and engine != "auto" and installed(engine, "bf16") is not None:
        return "fp32"
    return p


def plan(source: Source, config: RunConfig) -> tuple[str, str]:
    """(engine, precision) for `source` under `config`, "auto" engine left to measuring.
    Raises UserError for what cannot run: an engine or precision not installed or not
    offered, an exported file at another precision than its own, int8 off the CPU."""
    config.check(source.kind, source.name)
    if source.is_exported:
        return _plan_file(source, config)
    if config.reference:
        return "torch", "fp32"
    device = next(source.model.parameters()).device
    if device.type != "cpu" and (config.precision == "int8" or config.engine != "torch"):
        raise UserError("int8 and the ONNX Runtime and OpenVINO engines run on the CPU; "
                        "move the model there first")
    if config.engine == "torch" and config.precision != "int8":
        return "torch", decide_precision(config.precision, device, choices=("bf16", "fp32"))
    precision = decide_precision(resolve_precision(config.engine, config.precision, device),
                                 device, choices=("bf16", "fp32", "int8"))
    engine = config.engine
    if engine == "auto" and not config.measure:
        engine = next((e for e in PREFERRED.get(precision, ("torch",))
                       if installed(e, precision) is None), "torch")
    if engine != "auto" and installed(engine, precision):
        raise UserError(installed(engine, precision))
    return engine, precision


def _plan_file(source: Source, config: RunConfig) -> tuple[str, str]:
    engine = config.engine if config.engine != "auto" else \
        "onnxruntime" if source.kind == "onnx" else "openvino"
    own, precision = source.precision, config.precision
    if precision == "int8" and own != "int8" or own == "int8" and precision not in ("auto", own):
        raise UserError(f"{shown(Path(source.name).name)} is a {own} model; precision "
                        f"{precision} needs a checkpoint (or `resnetkit quantize` for int8)")
    precision = own if precision == "auto" else precision
    why = _offered(engine, precision)
    if why:
        raise UserError(why)
    return engine, precision


def check_runner(source: Source, config: RunConfig) -> None:
    """Everything open_runner checks before it builds: the engine and precision, and for
    int8 the calibration images (read, then let go). For a server, whose workers each open
    the model: one sentence before any of them starts."""
    _, precision = plan(source, config)
    if precision == "int8" and not source.is_exported:
        _calibration(source, config)


def open_runner(source: Source | str | Path, config: RunConfig | None = None) -> Runner:
    """`source` (a Source, or anything open_source reads: an exported file is then refused
    by engine before it is read) on the engine and at the precision `config` asks for, or
    chooses (see RunConfig, plan). Raises UserError for what cannot run."""
    config = config or RunConfig()
    if not isinstance(source, Source):
        config.check(kind_of(source), source)
        source = open_source(source)
    engine, precision = plan(source, config)
    if source.is_exported:
        return _on_file(source, engine, precision, config)
    model = source.model
    if config.reference:
        return Runner("torch", "fp32", model.eval(), source.meta, numpy_io=False, module=model)
    batches = _calibration(source, config) if precision == "int8" else None
    pre = source.meta.preprocess
    shape = config.shape or ((1, model.cfg.in_chans, pre["image_size"], pre["image_size"])
                             if pre else None)
    if engine != "auto":
        return build(model, engine, precision, batches, config, shape, source.meta)
    chosen = AutoRunner(model, precision, batches, config, source.meta)
    if config.shape is not None:
        chosen.resolve(tuple(config.shape))
    return chosen


def _calibration(source: Source, config: RunConfig) -> list[torch.Tensor]:
    meta, model = source.meta, source.model
    return calibration_set(config.calibration, model.cfg.in_chans,
                           config.shape[-1] if config.shape else 0, meta.preprocess,
                           config.calibration_batches * CALIBRATION_BATCH, config.data_dir,
                           classes=meta.classes)


def _on_file(source: Source, engine: str, precision: str, config: RunConfig) -> Runner:
    """An exported file on ONNX Runtime or OpenVINO (an int8 file runs as it is quantized;
    precision is then OpenVINO's for the float parts)."""
    threads = config.threads or torch.get_num_threads()
    if engine == "onnxruntime":
        sess = ort_backend.session(source.exported, threads, source.name)
        return Runner(engine, precision, ort_backend.runs(sess), source.meta)
    model = source.exported if source.kind == "openvino" else \
        ov_backend.read(source.exported, source.name)
    fixed = tuple(config.shape) if config.static and config.shape else None
    run = ov_backend.compiled(model, "fp32" if precision == "int8" else precision, threads,
                              fixed)
    return Runner(engine, precision, run, source.meta)


def build(model: ResNet, engine: str, precision: str, batches: list[torch.Tensor] | None,
          config: RunConfig, shape: tuple[int, ...] | None, meta: Meta) -> Runner:
    """`model` on one engine at one precision. batches: calibration batches (int8 only);
    shape: the input shape (its size is the exported files'; default the calibration
    images', else 224); config.static fixes OpenVINO's input to it."""
    name = meta.source
    if engine == "torch":
        why = not_direct(model, precision, config)
        if why is None:
            # a plan now, at the input's shape (or the model's own): a layer this CPU has no
            # oneDNN kernel for shows here, not at the first image
            size = model.pretrained_cfg["input_size"][-1]
            try:
                m = direct_backend.OneDnnResNet(model, precision, batches, name)
                m.prepare(tuple(shape) if shape else (1, model.cfg.in_chans, size, size))
                return Runner("torch", precision, m, meta, numpy_io=False, module=m)
            except UserError as e:
                if config.direct is True:
                    raise
                why = str(e)  # "auto": the PyTorch path below (whose own checks still apply)
        if config.direct is True:
            raise UserError(why)
        if precision == "int8":
            device = next(model.parameters()).device
            compiled = compile_pays(device) if config.compile == "auto" else bool(config.compile)
            m = Int8Model(quantize_graph(model, batches, name), compiled)
        else:
            m = optimized(model, precision, config.channels_last, config.fold, config.compile,
                          config.bf16_weights)
        return Runner("torch", m.precision, m, meta, numpy_io=False, module=m)
    threads = config.threads or torch.get_num_threads()
    size = shape[-1] if shape else (batches[0].shape[-1] if batches else 224)
    with tempfile.TemporaryDirectory() as work:
        onnx = Path(work) / "model.onnx"
        if engine == "onnxruntime":
            if precision == "int8":
                write_qdq_onnx(quantize_graph(model, batches, name), onnx,
                               torch.cat(batches)[:64])
            else:
                export(model, onnx, "onnx", size, dynamic_size=False)
            return Runner(engine, precision, ort_backend.runs(ort_backend.session(onnx, threads)),
                          meta)
        export(model, onnx, "onnx", size, dynamic_size=False)
        graph = ov_backend.read(onnx)
        if precision == "int8":
            check_calibration_outputs(model, batches, name)
            graph = ov_backend.nncf_quantize(graph, batches)
        fixed = tuple(shape) if config.static and shape else None
        run = ov_backend.compiled(graph, "fp32" if precision == "int8" else precision,
                                  threads, fixed)
    return Runner(engine, precision, run, meta)


def not_direct(model: ResNet, precision: str, config: RunConfig) -> str | None:
    """None when the torch engine takes its direct oneDNN path for `model` at `precision`
    under `config`, else why not (see RunConfig.direct). Raises UserError for direct=True
    with an option that asks for the PyTorch path."""
    pytorch = [name for name, asks in (
        ("compile=True", config.compile is True),
        # int8's compile=False is PT2E's reference float graph
        ("compile=False", config.compile is False and precision == "int8"),
        ("fold=False", not config.fold), ("channels_last=False", config.channels_last is False),
        ("bf16_weights=True", config.bf16_weights)) if asks]
    if config.direct is True and pytorch:
        raise UserError(f"direct=True runs resnetkit's own oneDNN path; {pytorch[0]} asks for "
                        f"PyTorch's: leave it out, or use direct=False")
    if config.direct is False:
        return "direct=False"
    if next(model.parameters()).device.type != "cpu":
        return "the direct oneDNN path runs on the CPU"
    if precision == "bf16" and not has_native_bf16("cpu"):
        return "the direct oneDNN path runs bf16 only on CPUs with native bf16"
    if pytorch:
        return f"{pytorch[0]} asks for the PyTorch path"
    why = direct_backend.unavailable() or direct_backend.unsupported(model)
    if why is None:
        try:
            direct_backend.library()  # built on first use: a failed build is a reason too
        except UserError as e:
            return str(e)
    return why


class AutoRunner(Runner):
    """engine "auto" before it has seen an input: the first call measures (or looks up) the
    fastest engine for that input's shape (see auto.fastest) and keeps it for every later
    call."""

    def __init__(self, model: ResNet, precision: str, batches: list[torch.Tensor] | None,
                 config: RunConfig, meta: Meta):
        super().__init__("auto", precision, None, meta)
        self._model, self._batches, self._config = model, batches, config
        self._chosen: Runner | None = None

    def resolve(self, shape: tuple[int, ...]) -> Runner:
        """Choose now, for inputs of `shape`."""
        if self._chosen is None:
            model, precision, shape = self._model, self.precision, tuple(shape)
            usable = [e for e in ENGINES if installed(e, precision) is None]
            self._chosen = auto.fastest(
                auto.cache_key(model, shape, precision), usable,
                lambda e: build(model, e, precision, self._batches, self._config, shape,
                                self.meta), shape)
            self.engine, self.timings = self._chosen.engine, self._chosen.timings
            self.module = self._chosen.module
            self._model = self._batches = None  # the chosen engine holds what it needs
        return self._chosen

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.resolve(tuple(x.shape))(x)

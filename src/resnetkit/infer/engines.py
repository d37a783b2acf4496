"""Engines as one choice: the same model run by PyTorch (resnetkit's fast path), ONNX Runtime
or OpenVINO at fp32, bf16 or int8, behind one callable (a preprocessed float NCHW tensor in,
fp32 logits out, `.engine` and `.precision` to say what runs). engine="auto" takes the one
measured fastest on this CPU for that model, input shape and precision: a short timing at
first use, remembered in a cache file per CPU model."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import UserError
from ..model import ResNet
from ..runtime import cpu_info, decide_precision
from ..untrusted import regular_file, shown

ENGINES = ("torch", "onnxruntime", "openvino")
PRECISIONS = {"torch": ("fp32", "bf16", "int8"), "onnxruntime": ("fp32", "int8"),
              "openvino": ("fp32", "bf16", "int8")}
ROUNDS = 5
WARMUP = 3


class Engine:
    """A model behind an engine: call it on a float NCHW tensor, get fp32 logits (a tensor).
    `engine` and `precision` name what runs; `timings` holds the img/s of every candidate
    when engine="auto" measured them (else None)."""

    def __init__(self, engine: str, precision: str, run: Callable[[Any], Any],
                 numpy_io: bool = True, timings: dict[str, float] | None = None):
        self.engine, self.precision, self._run = engine, precision, run
        self._numpy, self.timings = numpy_io, timings

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self._numpy:
            with torch.no_grad():
                return self._run(x).float()
        # copied: OpenVINO hands back its own output buffer, reused by the next call
        return torch.from_numpy(np.array(self._run(x.detach().float().contiguous().numpy())))

    def __repr__(self) -> str:
        return f"Engine({self.engine}, {self.precision})"


def installed(engine: str, precision: str) -> str | None:
    """None when `engine` can run `precision` here, else the sentence saying why not."""
    if engine not in ENGINES:
        return f"engine must be auto or one of {', '.join(ENGINES)}, got {engine!r}"
    if precision not in PRECISIONS[engine]:
        return (f"{engine} has no {precision} path on the CPU; use "
                f"{' or '.join(PRECISIONS[engine])}")
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
    if engine == "openvino" and precision == "bf16":
        from .export import openvino_precisions
        if "bf16" not in openvino_precisions():
            return "OpenVINO offers bf16 only on CPUs with native bf16 (AVX512-BF16 or AMX)"
    return None


def resolve_precision(engine: str, precision: str, device: torch.device | str = "cpu") -> str:
    """`precision`, with "auto" resolved for `engine`: bf16 where the device runs it natively
    and the engine has a bf16 path here (see installed), else fp32; never int8, which needs
    calibration images. For engine "auto" the engines are then chosen among those that run
    that precision (see choose)."""
    if precision != "auto":
        return precision
    p = decide_precision("auto", device, choices=("bf16", "fp32"))
    if p == "bf16" and engine != "auto" and installed(engine, "bf16") is not None:
        return "fp32"
    return p


def build(model: ResNet, engine: str, precision: str, batches: list[torch.Tensor] | None = None,
          compile: bool | str = "auto", shape: tuple[int, ...] | None = None,
          static: bool = False, source: Any = "the model") -> Engine:
    """`model` on one engine at one precision. batches: calibration batches (int8 only);
    shape: the input shape (its size is the exported files'; default the calibration
    images', else 224); static: fix OpenVINO's input to that shape (else a dynamic batch);
    source: the model's name in messages (see quantize.quantize_graph)."""
    why = installed(engine, precision)
    if why:
        raise UserError(why)
    if precision == "int8" and not batches:
        raise UserError("int8 needs calibration images (calibration=...)")
    if engine == "torch":
        if precision == "int8":
            from .optimize import compile_pays
            from .quantize import Int8Model, quantize_graph
            device = next(model.parameters()).device
            compiled = compile_pays(device) if compile == "auto" else bool(compile)
            return Engine("torch", "int8",
                          Int8Model(quantize_graph(model, batches, source), compiled),
                          numpy_io=False)
        from .optimize import optimize
        m = optimize(model, precision, compile=compile)
        return Engine("torch", precision, m, numpy_io=False)
    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp())
    try:
        size = shape[-1] if shape else (batches[0].shape[-1] if batches else 224)
        fixed = tuple(shape) if static and shape else None
        onnx = work / "model.onnx"
        if engine == "onnxruntime":
            from .export import export, onnx_session
            if precision == "int8":
                from .int8_files import write_qdq_onnx
                from .quantize import quantize_graph
                write_qdq_onnx(quantize_graph(model, batches, source), onnx,
                               torch.cat(batches)[:64])
            else:
                export(model, onnx, "onnx", size, dynamic_size=False)
            sess = onnx_session(onnx, threads)
            name = sess.get_inputs()[0].name
            return Engine("onnxruntime", precision, lambda a: sess.run(None, {name: a})[0])
        from .export import export, openvino_model
        export(model, onnx, "onnx", size, dynamic_size=False)
        if precision == "int8":
            from .int8_files import nncf_quantize
            from .quantize import check_calibration_outputs
            import openvino as ov
            check_calibration_outputs(model, batches, source)
            ov.save_model(nncf_quantize(onnx, batches), str(work / "int8.xml"))
            return Engine("openvino", "int8", openvino_model(work / "int8.xml", "fp32",
                                                             threads, fixed))
        return Engine("openvino", precision, openvino_model(onnx, precision, threads, fixed))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- engine="auto": measured once per CPU, model, shape and precision ----------------------

def cache_file() -> Path:
    """engines.json beside the weights cache ($RESNETKIT_CACHE/.. or ~/.cache/resnetkit)."""
    from ..weights.download import cache_dir
    return cache_dir().parent / "engines.json"


def cache_key(model: ResNet, shape: tuple[int, ...], precision: str) -> str:
    """CPU model, the instruction sets oneDNN may use, threads, architecture, shape,
    precision: what decides which engine is fastest (not the weights' values)."""
    info = cpu_info()
    arch = hashlib.sha256(repr(model.cfg).encode()).hexdigest()[:12]
    isa = hashlib.sha256(" ".join(sorted(info["flags"])).encode()).hexdigest()[:8]
    return (f"{info['name']}|isa {isa}|{torch.get_num_threads()} threads|{arch}|"
            f"{'x'.join(map(str, shape))}|{precision}")


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only means measuring again next time


def measure(candidates: dict[str, Engine], shape: tuple[int, ...],
            rounds: int = ROUNDS) -> dict[str, float]:
    """img/s of each engine on a random batch: WARMUP calls each (the first compiles; the
    next few still run slower while caches and allocators settle), then `rounds`
    interleaved rounds; medians."""
    x = torch.randn(shape)
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for e in candidates.values():
        for _ in range(WARMUP):
            e(x)
    for _ in range(rounds):
        for k, e in candidates.items():
            t = time.perf_counter()
            e(x)
            times[k].append(time.perf_counter() - t)
    return {k: shape[0] / statistics.median(v) for k, v in times.items()}


def choose(model: ResNet, precision: str, shape: tuple[int, ...],
           batches: list[torch.Tensor] | None = None, compile: bool | str = "auto",
           source: Any = "the model") -> Engine:
    """The engine measured fastest here for this model, input shape and precision (the
    measurement is cached; see cache_key). Engines that are not installed are left out."""
    usable = [e for e in ENGINES if installed(e, precision) is None]
    key = cache_key(model, shape, precision)
    known = _read_cache().get(key, {})
    if known.get("engine") in usable:
        e = build(model, known["engine"], precision, batches, compile, shape, source=source)
        e.timings = known.get("img_s")
        return e
    candidates = {e: build(model, e, precision, batches, compile, shape, source=source)
                  for e in usable}
    speed = measure(candidates, shape)
    best = max(speed, key=speed.get)
    _write_cache(key, {"engine": best, "img_s": speed, "measured": time.time()})
    winner = candidates[best]
    winner.timings = speed
    return winner


class AutoEngine:
    """engine="auto" before it has seen an input: the first call measures (or looks up) the
    fastest engine for that input's shape and keeps it for every later call."""

    engine = "auto"

    def __init__(self, model: ResNet, precision: str, batches: list[torch.Tensor] | None,
                 compile: bool | str = "auto", source: Any = "the model"):
        self._model, self.precision = model, precision
        self._batches, self._compile, self._source = batches, compile, source
        self._chosen: Engine | None = None
        self.timings: dict[str, float] | None = None

    def resolve(self, shape: tuple[int, ...]) -> Engine:
        """Choose now, for inputs of `shape`."""
        if self._chosen is None:
            self._chosen = choose(self._model, self.precision, tuple(shape), self._batches,
                                  self._compile, self._source)
            self.engine, self.timings = self._chosen.engine, self._chosen.timings
            self._model = self._batches = None  # the chosen engine holds what it needs
        return self._chosen

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.resolve(tuple(x.shape))(x)


# ---- exported files ------------------------------------------------------------------------

def open_file(path: str | Path, engine: str = "auto") -> tuple[Engine, dict[str, Any]]:
    """An exported file (.onnx, fp32 or int8 QDQ; .xml OpenVINO IR) on an engine that runs it,
    with its classes and preprocessing. engine "auto": ONNX Runtime for .onnx, OpenVINO for
    .xml. Raises UserError for an engine that cannot run the file or is not installed."""
    path = Path(path)
    kind = {".onnx": "onnx", ".xml": "openvino"}.get(path.suffix)
    if kind is None:
        raise UserError(f"{path.name} is not an exported model file (.onnx or .xml)")
    if engine == "auto":
        engine = "onnxruntime" if kind == "onnx" else "openvino"
    if engine == "torch" or (engine == "onnxruntime" and kind == "openvino"):
        runs = "onnxruntime or openvino" if kind == "onnx" else "openvino"
        raise UserError(f"{path.name} runs in {runs}, not in {engine}; the torch engine "
                        f"takes a checkpoint")
    if engine not in ENGINES:
        raise UserError(f"engine must be auto or one of {', '.join(ENGINES)}, got {engine!r}")
    regular_file(path, "model file")
    threads = torch.get_num_threads()
    if engine == "onnxruntime":
        from .export import onnx_meta, onnx_session
        sess = onnx_session(path, threads)
        name = sess.get_inputs()[0].name
        precision = "int8" if is_qdq_onnx(path) else "fp32"
        return (Engine("onnxruntime", precision, lambda a: sess.run(None, {name: a})[0]),
                onnx_meta(sess, str(path)))
    from .export import _openvino_core, openvino_model
    from .int8_files import openvino_meta
    try:
        core = _openvino_core()
    except ImportError:
        raise UserError("OpenVINO is not installed: pip install 'resnetkit[openvino]'") from None
    try:
        model = core.read_model(str(path))
    except Exception as e:  # OpenVINO raises its own exception types for unreadable files
        raise UserError(f"cannot load {path} in OpenVINO ({e})") from None
    info = openvino_meta(model, str(path)) if kind == "openvino" else _onnx_file_meta(path)
    int8 = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops()) or \
        kind == "onnx" and is_qdq_onnx(path)
    return Engine("openvino", "int8" if int8 else "fp32",
                  openvino_model(path, "fp32", threads)), info


def is_qdq_onnx(path: str | Path) -> bool:
    """Whether an ONNX file is int8 (QuantizeLinear nodes, as `resnetkit quantize` writes)."""
    import onnx
    return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node)


def _onnx_file_meta(path: Path) -> dict[str, Any]:
    from .export import onnx_meta, onnx_session
    return onnx_meta(onnx_session(path, 1), str(path))


def open_source(source: str | Path, engine: str = "auto", precision: str = "auto",
                calibration: str | None = None, data_dir: str | None = None
                ) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any]]:
    """(callable on a preprocessed float batch, {"classes", "preprocess"}) for an exported
    file (see open_file; `precision` must then be auto or the file's own) or a checkpoint on
    `engine` at `precision` ("auto": see resolve_precision; int8 calibrated on
    `calibration`, a dataset spec read with the checkpoint's preprocessing and classes; see
    optimize)."""
    run, model, info = _open(source, engine, precision, calibration)
    if run is None:
        run = _checkpoint_engine(model, info, source, engine, precision, calibration, data_dir)
    return run, info


def _open(source: str | Path, engine: str, precision: str, calibration: str | None
          ) -> tuple[Engine | None, ResNet | None, dict[str, Any]]:
    """(the engine, None, info) for an exported file; (None, the model, info) for a
    checkpoint, which _checkpoint_engine then builds (the slow part: export, calibration)."""
    if Path(source).suffix in (".onnx", ".xml"):
        run, info = open_file(source, engine)
        if precision not in ("auto", run.precision):
            raise UserError(f"{shown(Path(source).name)} is a {run.precision} model; precision "
                            f"{precision} needs a checkpoint (or `resnetkit quantize` for int8)")
        return run, None, info
    from ..weights.sources import load_source
    if calibration and precision != "int8":
        raise UserError("--calibration is for --precision int8 only")
    model, info = load_source(source)
    return None, model, info


def _checkpoint_engine(model: ResNet, info: dict[str, Any], source: str | Path, engine: str,
               precision: str, calibration: str | None, data_dir: str | None):
    from .optimize import optimize
    return optimize(model, precision, engine=engine, calibration=calibration,
                    preprocess=info.get("preprocess"), data_dir=data_dir,
                    classes=info.get("classes"), source=source)


def evaluate_on_engine(source: str | Path, dataset: str = "fashion-mnist", split: str = "test",
                       data_dir: str | None = None, engine: str = "auto",
                       precision: str = "auto", calibration: str | None = None,
                       tta_flip: bool = False, batch_size: int = 256) -> dict[str, Any]:
    """`resnetkit eval` of an exported file, or of a checkpoint on an engine (see
    open_source): the dataset split read at the model's input size and channels, in its
    preprocessing and labelled by its classes by name (evaluate.eval_data, as every engine
    is), before any export or calibration; the result of evaluate() plus "engine" and
    "precision"."""
    from ..evaluate import eval_data, evaluate, left_out_note
    run, model, info = _open(source, engine, precision, calibration)
    pre = info.get("preprocess")
    if pre is None:
        raise UserError(f"{shown(source)} has no preprocessing metadata; export it from a "
                        f"trained checkpoint")
    classes = info.get("classes")
    data, left_out = eval_data(dataset, split, data_dir, pre,
                               pre.get("in_chans") or len(pre["mean"]), classes,
                               len(classes) if classes is not None else
                               model.num_classes if model is not None else None)
    if run is None:
        run = _checkpoint_engine(model, info, source, engine, precision, calibration, data_dir)
    r = evaluate(run, data, pre["mean"], pre["std"], pre.get("image_size", 0), batch_size,
                 tta_flip=tta_flip, source=source, where=f"{dataset} {split}")
    return {**r, "engine": getattr(run, "engine", engine),
            "precision": getattr(run, "precision", precision), **left_out_note(left_out)}

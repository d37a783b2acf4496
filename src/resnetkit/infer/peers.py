"""The peer engines at their best: ONNX Runtime and OpenVINO, at each precision they offer,
in the configurations a competent user of each would try, timed side by side on the batch
that is to be measured; the fastest is kept, and the whole table is reported.

The search goes in two stages, so that its cost grows with the number of choices rather than
with their product: first the exported file (torch.export's ONNX exporter or the TorchScript
one; the batch fixed in the file or left dynamic) with each engine's defaults, then, on the
fastest file, one engine option changed at a time (ONNX Runtime: graph optimisation level,
int8 quantizer and format; OpenVINO: performance hint, NNCF preset, calibration subset, bias
correction, and the precision of the ops NNCF leaves in float). A configuration that fails to build or run is a row with its error."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import UserError
from ..model import ResNet
from .backends import onnxruntime as ort_backend
from .backends import openvino as ov_backend
from .export import EXPORTERS, export
from .int8_files import write_qdq_onnx
from .quantize import quantize_graph
from .timing import interleaved, per_second

SHAPES = ("static", "dynamic")
MODES = ("search", "defaults")

# Each engine's options where a user starts. ORT int8 "pt2e": the QDQ file resnetkit writes
# (`resnetkit quantize`: the PT2E graph's own scales, exported with a dynamic batch); "ort":
# ONNX Runtime's quantize_static on the exported fp32 file.
DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("onnxruntime", "fp32"): {"level": "all"},
    ("onnxruntime", "int8"): {"quantizer": "pt2e", "format": "qdq", "level": "all"},
    ("openvino", "fp32"): {"hint": "LATENCY"},
    ("openvino", "bf16"): {"hint": "LATENCY"},
    ("openvino", "int8"): {"preset": "performance", "subset": "all",
                           "fast_bias_correction": True, "hint": "LATENCY",
                           "float_ops": "fp32"},
}
# the second stage: each entry changes one option of the first stage's fastest
VARIANTS: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("onnxruntime", "fp32"): [{"level": "extended"}, {"level": "basic"}],
    ("onnxruntime", "int8"): [{"quantizer": "ort"}, {"quantizer": "ort", "format": "qoperator"},
                              {"level": "extended"}],
    ("openvino", "fp32"): [{"hint": "THROUGHPUT"}],
    ("openvino", "bf16"): [{"hint": "THROUGHPUT"}],
    ("openvino", "int8"): [{"preset": "mixed"}, {"fast_bias_correction": False},
                           {"subset": "half"}, {"hint": "THROUGHPUT"},
                           {"float_ops": "bf16"}],  # where the CPU has bf16
}


@dataclass(frozen=True)
class PeerConfig:
    """One way to run a peer engine: the exported file (exporter, static or dynamic batch)
    and the engine's options (see DEFAULTS)."""

    engine: str
    precision: str
    exporter: str = "dynamo"
    shape: str = "static"
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.engine}_{self.precision}"

    def get(self, key: str) -> Any:
        return dict(self.options)[key]

    def changed(self, **kw: Any) -> PeerConfig:
        file = {k: kw.pop(k) for k in ("exporter", "shape") if k in kw}
        return PeerConfig(self.engine, self.precision, file.get("exporter", self.exporter),
                          file.get("shape", self.shape),
                          tuple({**dict(self.options), **kw}.items()))

    def describe(self) -> dict[str, Any]:
        d = {"exporter": self.exporter, "shape": self.shape, **dict(self.options)}
        if d.get("quantizer") == "pt2e":  # its own export: torch.export, any batch
            d.update(exporter="dynamo", shape="dynamic")
        return d

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.describe().items())


def default_config(engine: str, precision: str, static: bool) -> PeerConfig:
    return PeerConfig(engine, precision, "dynamo", "static" if static else "dynamic",
                      tuple(DEFAULTS[engine, precision].items()))


@dataclass
class Peer:
    """The chosen configuration of one engine at one precision, its function of a float
    NCHW array, and the table of what was tried ({"config", "img_s"} or {"config",
    "error"} rows, in the order tried)."""

    config: PeerConfig
    run: Callable[[np.ndarray], np.ndarray]
    tried: list[dict[str, Any]] = field(default_factory=list)


class Files:
    """The fp32 model's ONNX files, one per (exporter, static/dynamic batch), written once
    into a folder of their own (removed by close())."""

    def __init__(self, model: ResNet, shape: tuple[int, ...]):
        self.model, self.shape = model, shape
        self.work = Path(tempfile.mkdtemp(prefix="resnetkit-peers-"))
        self._paths: dict[tuple[str, str], Path] = {}
        self.quantized: dict[tuple[Any, ...], Any] = {}  # NNCF's models, by what made them

    def onnx(self, exporter: str, shape: str) -> Path:
        if (exporter, shape) not in self._paths:
            path = self.work / f"{exporter}-{shape}.onnx"
            export(self.model, path, "onnx", self.shape[-1], dynamic_size=False,
                   batch=self.shape[0] if shape == "static" else 0, exporter=exporter)
            self._paths[exporter, shape] = path
        return self._paths[exporter, shape]

    def close(self) -> None:
        self.quantized.clear()
        shutil.rmtree(self.work, ignore_errors=True)


def rebatch(batches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The calibration images in batches of exactly n (the remainder left out), as a file of
    fixed batch size takes them; all of them in one batch where there are fewer than n."""
    images = torch.cat(batches)
    if len(images) < n:
        return [images]
    return list(images[: len(images) // n * n].split(n))


def build(cfg: PeerConfig, files: Files, batches: list[torch.Tensor] | None,
          threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The function of a float NCHW array that `cfg` describes (int8: calibrated on
    `batches`). Raises whatever the engine or its quantizer raises."""
    opts = dict(cfg.options)
    static = cfg.shape == "static"
    calib = rebatch(batches, files.shape[0]) if batches is not None and static else batches
    if cfg.engine == "onnxruntime":
        if cfg.precision == "int8" and opts["quantizer"] == "pt2e":
            path = files.work / "pt2e-qdq.onnx"
            if not path.exists():
                write_qdq_onnx(quantize_graph(files.model, batches), path,
                               torch.cat(batches)[:64])
        elif cfg.precision == "int8":
            path = files.work / f"ort-{opts['format']}-{cfg.exporter}-{cfg.shape}.onnx"
            if not path.exists():
                ort_backend.quantize_static(files.onnx(cfg.exporter, cfg.shape), path,
                                            [b.numpy() for b in calib], opts["format"])
        else:
            path = files.onnx(cfg.exporter, cfg.shape)
        return ort_backend.runs(ort_backend.session(path, threads, level=opts["level"]))
    graph = ov_backend.read(files.onnx(cfg.exporter, cfg.shape))
    precision = cfg.precision
    if cfg.precision == "int8":
        # the ops NNCF leaves in float run at `float_ops` (OpenVINO's inference precision)
        precision = opts["float_ops"]
        made_by = (cfg.exporter, cfg.shape, opts["preset"], opts["subset"],
                   opts["fast_bias_correction"])
        if made_by not in files.quantized:
            subset = len(calib) if opts["subset"] == "all" else max(1, len(calib) // 2)
            files.quantized[made_by] = ov_backend.nncf_quantize(
                graph, calib, opts["preset"], subset, opts["fast_bias_correction"])
        graph = files.quantized[made_by]
    return ov_backend.compiled(graph, precision, threads,
                               tuple(files.shape) if static else None, opts["hint"])


def last_line(e: Exception) -> str:
    """The last line of an engine's error (its own exception types say the most there)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


def _stage(configs: list[PeerConfig], files: Files, batches: list[torch.Tensor] | None,
           x: np.ndarray, threads: int, rounds: int, tried: list[dict[str, Any]],
           built: dict[PeerConfig, Callable] | None = None
           ) -> dict[PeerConfig, tuple[float, Callable]]:
    """Build (unless `built` holds it) and time `configs` side by side; rows go into
    `tried`. {config: (img/s, run)} of those that built and ran."""
    runs: dict[PeerConfig, Callable] = {}
    for cfg in configs:
        try:
            run = (built or {}).get(cfg) or build(cfg, files, batches, threads)
            out = np.asarray(run(x))
            if out.shape[0] != len(x) or not np.isfinite(out).all():
                raise RuntimeError(f"it gave {out.shape} outputs, or ones that are not finite")
            runs[cfg] = run
        except Exception as e:  # the engine's or its quantizer's own exception types, or a
            # UserError for what this configuration needs (torchao for the PT2E file)
            tried.append({"config": cfg.describe(), "error": last_line(e)})
    if not runs:
        return {}
    labels = {cfg.label(): cfg for cfg in runs}
    speed = per_second(interleaved({k: (lambda r=runs[c]: r(x)) for k, c in labels.items()},
                                   rounds), len(x))
    for k, cfg in labels.items():
        tried.append({"config": cfg.describe(), "img_s": speed[k]})
    return {cfg: (speed[k], runs[cfg]) for k, cfg in labels.items()}


def best_peer(engine: str, precision: str, files: Files, batches: list[torch.Tensor] | None,
              threads: int = 0, mode: str = "search", rounds: int = 3,
              static: bool = True) -> Peer:
    """`engine` at `precision` for inputs of files.shape: mode "search" tries the
    configurations (see the module's note) with `rounds` timed calls each and keeps the
    fastest; "defaults" builds DEFAULTS on a `static` (else dynamic-batch) file untimed.
    Raises RuntimeError (the last failure) when no configuration builds."""
    threads = threads or torch.get_num_threads()
    tried: list[dict[str, Any]] = []
    x = torch.randn(files.shape, generator=torch.Generator().manual_seed(0)).numpy()
    first = default_config(engine, precision, static)
    if mode == "defaults":
        try:
            return Peer(first, build(first, files, batches, threads))
        except UserError:
            raise
        except Exception as e:
            raise RuntimeError(last_line(e)) from e
    if mode not in MODES:
        raise UserError(f"the peer search is one of {', '.join(MODES)}, not {mode!r}")
    shapes = SHAPES if static else ("dynamic",)
    stage1 = [first.changed(exporter=e, shape=s) for e in EXPORTERS for s in shapes]
    if first.options and dict(first.options).get("quantizer") == "pt2e":
        # its file is its own: the exported fp32 files are tried with ORT's quantizer
        stage1 = [first] + [c.changed(quantizer="ort") for c in stage1]
    done = _stage(stage1, files, batches, x, threads, rounds, tried)
    if not done:
        raise RuntimeError(tried[-1]["error"] if tried else "nothing to try")
    lead = max(done.items(), key=lambda kv: kv[1][0])[0]
    stage2 = [lead.changed(**v) for v in VARIANTS[engine, precision]
              if v.get("float_ops") != "bf16" or "bf16" in ov_backend.precisions()]
    stage2 = [c for c in dict.fromkeys(stage2) if c != lead and c not in done]
    lead_run = done[lead][1]
    del done  # the other files' engines let go before the next stage builds
    # the leader is timed again beside the variants, so that they are compared in one stage
    again = _stage([lead, *stage2], files, batches, x, threads, rounds, tried,
                   {lead: lead_run})
    chosen, (_, run) = max(again.items(), key=lambda kv: kv[1][0])
    return Peer(chosen, run, tried)

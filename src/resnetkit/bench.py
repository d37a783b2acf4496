"""Side-by-side throughput: plain PyTorch vs resnetkit's paths vs ONNX Runtime/OpenVINO,
interleaved round by round in one process so machine noise hits every path alike."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import UserError
from .evaluate import evaluate_checkpoint
from .geometry import check_input_size
from .infer.optimize import compile_pays, optimize
from .runtime import allocator_state, decide_channels_last, hardware, has_native_bf16
from .zoo import create_model

__all__ = ["bench", "check", "hardware", "training_step"]


def _time(fn: Callable[[], Any], cuda: bool) -> float:
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def training_step(m: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                  y: torch.Tensor, bf16: bool) -> Callable[[], None]:
    """One forward + backward + optimizer step on a fixed batch, bf16 autocast if asked."""
    def run() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(m(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def _export_onnx(model: torch.nn.Module, image_size: int, notes: list[str]) -> Path | None:
    """The model exported to a temporary ONNX file for the engines, or None (with a note)
    when the exporter's packages are missing."""
    from .infer.export import export
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    try:
        export(model, path, "onnx", image_size, dynamic_size=False)
    except ImportError as e:
        notes.append(f"ONNX export needs pip install 'resnetkit[export]' ({e}): "
                     "ONNX Runtime and OpenVINO skipped")
        return None
    return path


def _engines(model: torch.nn.Module, image_size: int, notes: list[str],
             shape: tuple[int, ...] | None = None) -> dict[str, tuple[str, Callable]]:
    """{name: (precision, run)} for ONNX Runtime and OpenVINO (each precision its CPU plugin
    offers) on the exported file; run maps a numpy batch to numpy logits. shape fixes
    OpenVINO's input shape (None: dynamic batch). Absent engines are skipped with a note."""
    from .infer.export import onnx_session, openvino_model, openvino_precisions
    path = _export_onnx(model, image_size, notes)
    if path is None:
        return {}
    runners: dict[str, tuple[str, Callable]] = {}
    threads = torch.get_num_threads()
    try:
        sess = onnx_session(path, threads)
        name = sess.get_inputs()[0].name
        runners["onnxruntime_fp32"] = ("fp32", lambda a: sess.run(None, {name: a})[0])
    except UserError as e:
        notes.append(f"{e}: skipped")
    precs = openvino_precisions()
    if not precs:
        notes.append("openvino not installed: skipped (pip install 'resnetkit[openvino]')")
    for p in precs:
        try:
            runners[f"openvino_{p}"] = (p, openvino_model(path, p, threads, shape))
        except Exception as e:  # OpenVINO's own exception types
            _peer_failed(f"openvino_{p}", e, notes)
    return runners


def _working(paths: dict[str, tuple[str, Callable]], probe: Any, notes: list[str]
             ) -> dict[str, tuple[str, Callable]]:
    """The peer engines' paths that run on `probe` (one small batch). A peer engine that
    fails here is dropped with a note instead of ending the run: OpenVINO's CPU plugin, for
    one, cannot build its convolution and pooling nodes under ONEDNN_MAX_CPU_ISA=AVX2 on an
    AVX-512 CPU. resnetkit's own paths are not probed: their failure is an error."""
    ok = {}
    for name, (prec, run) in paths.items():
        if not name.startswith("resnetkit"):
            try:
                run(probe)
            except Exception as e:  # the peer engine's own exception types
                _peer_failed(name, e, notes)
                continue
        ok[name] = (prec, run)
    return ok


def _peer_failed(name: str, e: Exception, notes: list[str]) -> None:
    """The note for a peer engine that failed to build or run here."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    notes.append(f"{name} skipped: it failed on this machine"
                 f"{f' with ONEDNN_MAX_CPU_ISA={cap}' if cap else ''} "
                 f"({(lines[-1] if lines else type(e).__name__)[:200]})")


def _int8_paths(base: torch.nn.Module, batches: list[torch.Tensor], notes: list[str],
                shape: tuple[int, ...] | None = None, onnx: bool = True,
                compiled: bool = True, source: Any = "the model"
                ) -> dict[str, tuple[str, Callable]]:
    """{name: ("int8", run on a float batch)}: resnetkit's PT2E int8 model (compiled with
    frozen weights where optimize() compiles), and where installed ONNX Runtime on its QDQ
    export and OpenVINO on NNCF's quantization, all calibrated on `batches`. Engines that
    are not installed are skipped with a note. A model whose outputs on the calibration
    images are not finite is a UserError naming `source`."""
    from .infer.engines import build, installed
    from .infer.quantize import Int8Model, quantize_graph
    paths: dict[str, tuple[str, Callable]] = {}
    why = installed("torch", "int8")
    if why:
        notes.append(f"{why}: int8 paths skipped")
        return paths
    paths["resnetkit_int8"] = ("int8", Int8Model(quantize_graph(base, batches, source),
                                                 compiled))
    for engine in ("onnxruntime", "openvino") if onnx else ():
        why = installed(engine, "int8")
        if why:
            notes.append(f"{why}: {engine}_int8 skipped")
            continue
        try:
            paths[f"{engine}_int8"] = ("int8", build(base, engine, "int8", batches,
                                                     shape=shape, static=shape is not None,
                                                     source=source))
        except UserError:
            raise
        except Exception as e:  # the engine's (or its quantizer's) own exception types
            _peer_failed(f"{engine}_int8", e, notes)
    return paths


def _paths(model: str, x: torch.Tensor, y: torch.Tensor, image_size: int, train: bool,
           onnx: bool, compile: bool, notes: list[str], int8: bool = True, **build: Any
           ) -> tuple[dict[str, Callable[[], Any]], dict[str, str], bool]:
    """Every timed path ({name: run}), its precision, and whether optimize() compiles by
    default here. `build` holds create_model's in_chans and num_classes."""
    dev = x.device
    base = create_model(model, **build).to(dev).eval()
    fast = optimize(base, compile=False)

    def infer(m):
        def run():
            with torch.inference_mode():
                m(x)
        return run
    paths = {"baseline_fp32_nchw": infer(base), "resnetkit_infer": infer(fast)}
    precision = {"baseline_fp32_nchw": "fp32", "resnetkit_infer": fast.precision}
    auto_compiles = compile_pays(dev)
    if compile or auto_compiles:
        paths["resnetkit_infer_compiled"] = infer(optimize(base, compile=True))
        precision["resnetkit_infer_compiled"] = fast.precision
    if onnx and dev.type == "cpu":
        xn = x.numpy()
        engines = _working(_engines(base, image_size, notes, tuple(x.shape)), xn, notes)
        for name, (prec, run) in engines.items():
            paths[name] = lambda run=run: run(xn)
            precision[name] = prec
    elif onnx:
        notes.append("ONNX Runtime and OpenVINO are timed on the CPU only (use --device cpu)")
    if int8 and dev.type == "cpu":
        # random weights, so random calibration images: the speed does not depend on them
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randn(x.shape, generator=gen) for _ in range(2)]
        int8_paths = _working(_int8_paths(base, batches, notes, tuple(x.shape), onnx,
                                          auto_compiles or compile), x, notes)
        for name, (prec, run) in int8_paths.items():
            paths[name] = infer(run)
            precision[name] = prec
    elif int8:
        notes.append("int8 is timed on the CPU only (use --device cpu)")
    if train:
        tb = create_model(model, **build).to(dev).train()
        ob = torch.optim.SGD(tb.parameters(), lr=0.01, momentum=0.9)
        bf16 = has_native_bf16(dev)
        prec = "bf16" if bf16 else "fp32"
        cl = decide_channels_last("auto", prec, dev)  # what the trainer would pick
        tt = create_model(model, **build).to(dev).train()
        tt = tt.to(memory_format=torch.channels_last) if cl else tt
        ot = torch.optim.SGD(tt.parameters(), lr=0.01, momentum=0.9)
        xt = x.contiguous(memory_format=torch.channels_last) if cl else x
        paths["train_baseline_fp32_nchw"] = training_step(tb, ob, x, y, False)
        paths["train_resnetkit"] = training_step(tt, ot, xt, y, bf16)
        precision["train_baseline_fp32_nchw"] = "fp32"
        precision["train_resnetkit"] = prec
    return paths, precision, auto_compiles


def _summarise(times: dict[str, list[float]], precision: dict[str, str], batch: int,
               macs: int, hw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per path: median images/s and ms per batch, spread, FLOP/s against the peak, and the
    speed-ups against the fp32 NCHW baseline of its kind (inference or training)."""
    results = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        ips = batch / med
        flop = 2 * macs * ips * (3 if k.startswith("train") else 1)  # backward ~ 2x forward
        peak = hw.get({"bf16": "peak_bf16_gflops", "int8": "peak_int8_gops"}.get(
            precision[k], "peak_fp32_gflops"))
        results[k] = {"img_s": ips, "ms_per_batch": med * 1e3,
                      "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                      "round_ms": [t * 1e3 for t in ts],
                      "precision": precision[k], "gflops": flop / 1e9,
                      "fraction_of_peak": flop / 1e9 / peak if peak else None}
    for k, r in results.items():
        ref = "train_baseline_fp32_nchw" if k.startswith("train") else "baseline_fp32_nchw"
        r["speedup"] = r["img_s"] / results[ref]["img_s"]
        # the same ratio taken round by round (both timed within seconds of each other), so
        # a slow phase of the machine that spans several rounds cancels out
        r["speedup_paired"] = statistics.median(
            a / b for a, b in zip(results[ref]["round_ms"], r["round_ms"]))
    return results


def bench(model: str = "resnet50", batch: int = 16, image_size: int = 224, threads: int = 0,
          rounds: int = 7, warmup: int = 2, in_chans: int = 3, num_classes: int = 1000,
          train: bool = True, onnx: bool = True, compile: bool = False,
          device: str = "auto", int8: bool = True) -> dict[str, Any]:
    """Median images/s and ms per batch of each path, their spread, speed-ups against the
    eager fp32 NCHW baseline (ratio of medians, and the median of the per-round ratios) and
    achieved FLOP/s as a fraction of peak. device: "auto" (CUDA when there is one), "cpu" or
    "cuda[:N]"; ONNX Runtime and OpenVINO run on the CPU only, so they are timed only there.
    int8: also time the int8 paths (CPU only; calibrated on random images, as the weights
    are random). An int8 path's "gflops" counts int8 operations, its fraction is of the
    int8 peak. The peak's clock is measured where the OS does not report it (see
    runtime.hardware)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not str(device).split(":")[0] in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if rounds < 1 or warmup < 0 or num_classes < 1 or in_chans < 1:
        raise UserError("rounds, num_classes and in_chans must be >= 1 (warmup >= 0)")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"device must be auto, cpu or cuda[:N], got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but this PyTorch sees no CUDA device")
    if batch < 1:
        raise UserError(f"batch size must be >= 1, got {batch}")
    if threads < 0:
        raise UserError(f"thread count must be >= 1 (or 0 for the default), got {threads}")
    if threads:
        torch.set_num_threads(threads)
    build = {"in_chans": in_chans, "num_classes": num_classes}
    from .analysis.summary import flops as count
    with torch.device("meta"):
        check_input_size(create_model(model, **build), image_size)
    macs = count(model, image_size, **build)["macs"]
    x = torch.randn(batch, in_chans, image_size, image_size, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    notes: list[str] = []
    paths, precision, auto_compiles = _paths(model, x, y, image_size, train, onnx, compile,
                                             notes, int8, **build)
    for fn in paths.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, fn in paths.items():
            times[k].append(_time(fn, dev.type == "cuda"))
    hw = hardware(dev, measure=True)
    return {"model": model, "batch": batch, "image_size": image_size, "in_chans": in_chans,
            "rounds": rounds, "macs_per_image": macs, "hardware": hw,
            "results": _summarise(times, precision, batch, macs, hw),
            "optimize_default": "resnetkit_infer_compiled" if auto_compiles else "resnetkit_infer",
            "allocator": allocator_state(),
            "notes": notes, "pid": os.getpid()}


def check(checkpoint: str | Path, dataset: str = "fashion-mnist", data_dir: str | None = None,
          batch: int = 500, onnx: bool = True, compile: bool = False,
          limit: int = 0, int8: bool = True, calibration_images: int = 512) -> dict[str, Any]:
    """The accuracy guard: every fast path's logits against the eager fp32 model's on a real
    test set, for a trained checkpoint. Reports per path its top-1 accuracy, its top-1
    agreement with fp32 (fraction of images with the same predicted class) and the max and
    mean absolute logit difference (see evaluate_checkpoint). int8: also the int8 paths,
    calibrated on `calibration_images` images of the dataset's training split in the
    checkpoint's preprocessing (never on the test images they are judged on)."""
    import numpy as np
    from .weights.sources import load_source
    notes: list[str] = []
    info = load_source(checkpoint)[1]
    pre = info.get("preprocess")

    def variants(model: torch.nn.Module, image_size: int) -> dict[str, tuple[str, Callable]]:
        fast = optimize(model, compile=False)
        paths: dict[str, tuple[str, Callable]] = {"resnetkit_infer": (fast.precision, fast)}
        if compile or compile_pays(next(model.parameters()).device):
            paths["resnetkit_infer_compiled"] = (fast.precision, optimize(model, compile=True))
        if onnx:
            probe = torch.zeros(2, model.cfg.in_chans, image_size, image_size).numpy()
            for name, (prec, run) in _working(_engines(model, image_size, notes), probe,
                                              notes).items():
                paths[name] = (prec, lambda x, run=run: torch.from_numpy(np.array(run(x.numpy()))))
        if int8 and next(model.parameters()).device.type == "cpu":
            from .infer.quantize import calibration_set
            batches = calibration_set(f"{dataset}:{calibration_images}", model.cfg.in_chans,
                                      image_size, pre, data_dir=data_dir,
                                      classes=info.get("classes"))
            notes.append(f"int8 calibrated on {calibration_images} images of the {dataset} "
                         f"training split")
            paths.update(_working(_int8_paths(model, batches, notes, onnx=onnx,
                                              compiled=compile or compile_pays(torch.device("cpu")),
                                              source=checkpoint),
                                  batches[0][:2], notes))
        return paths
    r = evaluate_checkpoint(checkpoint, dataset, "test", data_dir, limit=limit,
                            batch_size=batch, variants=variants)
    r["notes"] = notes
    return r

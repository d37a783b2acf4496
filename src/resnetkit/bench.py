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
from .infer.optimize import compile_pays, optimize
from .runtime import allocator_state
from .train.trainer import cpu_flags, has_native_bf16
from .zoo import create_model


# Dense tensor-core peaks from the vendors' data sheets, TFLOP/s: (fp32 without tensor
# cores, tf32, bf16); the first name that is part of the device's name wins.
GPU_PEAKS = (("H100 PCIe", (51.0, 378.0, 756.0)), ("H100", (67.0, 494.7, 989.4)),
             ("H200", (67.0, 494.7, 989.4)), ("A100", (19.5, 156.0, 312.0)),
             ("L4", (30.3, 60.0, 121.0)))


def hardware(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Device name, cores and peak FLOP/s (fp32 and bf16) where they can be derived."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = next((v for k, v in GPU_PEAKS if k in name), None)
        # PyTorch runs fp32 convolutions on TF32 tensor cores unless told not to
        tf32 = torch.backends.cudnn.allow_tf32
        return {"device": name, "threads": threads, "fp32_convs": "tf32" if tf32 else "fp32",
                "peak_fp32_gflops": peaks[1 if tf32 else 0] * 1e3 if peaks else None,
                "peak_bf16_gflops": peaks[2] * 1e3 if peaks else None}
    flags, name, mhz = cpu_flags(), "cpu", 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "cpu":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":", 1)[1])
    except OSError:
        pass
    # FLOP per cycle per core: AVX-512 = 2 FMA units x 16 fp32 lanes x 2; AMX-BF16 tiles
    # = 1024 bf16 FLOP; AVX512-BF16 dot products = 2 x 32 x 2; AVX2 = 2 x 8 x 2.
    fp32 = 64 if "avx512f" in flags else 32
    bf16 = 1024 if "amx_bf16" in flags else (128 if "avx512_bf16" in flags else fp32)
    ghz = mhz / 1000
    return {"device": name, "threads": threads, "ghz": ghz, "avx512": "avx512f" in flags,
            "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "peak_fp32_gflops": threads * fp32 * ghz, "peak_bf16_gflops": threads * bf16 * ghz}


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
        export(model, path, "onnx", image_size)
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
        runners[f"openvino_{p}"] = (p, openvino_model(path, p, threads, shape))
    return runners


def bench(model: str = "resnet50", batch: int = 16, image_size: int = 224, threads: int = 0,
          rounds: int = 7, warmup: int = 2, in_chans: int = 3, num_classes: int = 1000,
          train: bool = True, onnx: bool = True, compile: bool = False,
          device: str = "auto") -> dict[str, Any]:
    """Median images/s and ms per batch of each path, their spread, speed-ups against the
    eager fp32 NCHW baseline (ratio of medians, and the median of the per-round ratios) and
    achieved FLOP/s as a fraction of peak. device: "auto" (CUDA when there is one), "cpu" or
    "cuda[:N]"; ONNX Runtime and OpenVINO run on the CPU only, so they are timed only there."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda asked for, but this PyTorch sees no CUDA device")
    if batch < 1:
        raise UserError(f"batch size must be >= 1, got {batch}")
    if threads < 0:
        raise UserError(f"thread count must be >= 1 (or 0 for the default), got {threads}")
    if threads:
        torch.set_num_threads(threads)
    base = create_model(model, in_chans=in_chans, num_classes=num_classes).to(dev).eval()
    if image_size < base.min_input_size:
        raise UserError(f"image size {image_size} is too small for {model}: it needs at least "
                        f"{base.min_input_size}")
    from .analysis.summary import flops as count
    macs = count(model, image_size, in_chans=in_chans, num_classes=num_classes)["macs"]
    x = torch.randn(batch, in_chans, image_size, image_size, device=dev)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    fast = optimize(base, compile=False)
    paths: dict[str, Callable[[], Any]] = {}
    precision = {"baseline_fp32_nchw": "fp32"}

    def infer(m):
        def run():
            with torch.inference_mode():
                m(x)
        return run
    paths["baseline_fp32_nchw"] = infer(base)
    paths["resnetkit_infer"] = infer(fast)
    precision["resnetkit_infer"] = fast.precision
    notes = []
    auto_compiles = compile_pays(x.device)
    if compile or auto_compiles:
        paths["resnetkit_infer_compiled"] = infer(optimize(base, compile=True))
        precision["resnetkit_infer_compiled"] = fast.precision
    if onnx and dev.type == "cpu":
        xn = x.numpy()
        for name, (prec, run) in _engines(base, image_size, notes, tuple(x.shape)).items():
            paths[name] = lambda run=run: run(xn)
            precision[name] = prec
    elif onnx:
        notes.append("ONNX Runtime and OpenVINO are timed on the CPU only (use --device cpu)")
    if train:
        tb = create_model(model, in_chans=in_chans, num_classes=num_classes).to(dev).train()
        ob = torch.optim.SGD(tb.parameters(), lr=0.01, momentum=0.9)
        bf16 = has_native_bf16(x.device)
        tt = create_model(model, in_chans=in_chans, num_classes=num_classes).to(dev).train()
        if bf16:
            tt = tt.to(memory_format=torch.channels_last)
        ot = torch.optim.SGD(tt.parameters(), lr=0.01, momentum=0.9)
        xcl = x.contiguous(memory_format=torch.channels_last) if bf16 else x

        paths["train_baseline_fp32_nchw"] = training_step(tb, ob, x, y, False)
        paths["train_resnetkit"] = training_step(tt, ot, xcl, y, bf16)
        precision["train_baseline_fp32_nchw"] = "fp32"
        precision["train_resnetkit"] = "bf16" if bf16 else "fp32"
    for fn in paths.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, fn in paths.items():
            times[k].append(_time(fn, dev.type == "cuda"))
    hw = hardware(dev)
    results = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        ips = batch / med
        flop = 2 * macs * ips * (3 if k.startswith("train") else 1)  # backward ~ 2x forward
        peak = hw.get("peak_bf16_gflops" if precision[k] == "bf16" else "peak_fp32_gflops")
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
    return {"model": model, "batch": batch, "image_size": image_size, "in_chans": in_chans,
            "rounds": rounds, "macs_per_image": macs, "hardware": hw, "results": results,
            "optimize_default": "resnetkit_infer_compiled" if auto_compiles else "resnetkit_infer",
            "allocator": allocator_state(),
            "notes": notes, "pid": os.getpid()}


def check(checkpoint: str | Path, dataset: str = "fashion-mnist", data_dir: str | None = None,
          batch: int = 500, onnx: bool = True, compile: bool = False,
          limit: int = 0) -> dict[str, Any]:
    """The accuracy guard: every fast path's logits against the eager fp32 model's on a real
    test set, for a trained checkpoint. Reports per path its top-1 accuracy, its top-1
    agreement with fp32 (fraction of images with the same predicted class) and the max and
    mean absolute logit difference."""
    import numpy as np

    from .data import load_dataset, materialize
    from .train.checkpoint import load_model
    from .train.trainer import prepare
    if batch < 1:
        raise UserError(f"batch size must be >= 1, got {batch}")
    model, info = load_model(checkpoint)
    model.eval()
    pre = info.get("preprocess", {})
    size = pre.get("image_size", 0)
    data = materialize(load_dataset(dataset, "test", data_dir, size, model.cfg.in_chans),
                       classes=info.get("classes"))
    if len(data.classes) != model.num_classes:
        raise UserError(f"dataset {dataset} has {len(data.classes)} classes, the checkpoint "
                        f"{model.num_classes}")
    n = min(limit, len(data)) if limit else len(data)
    batches = [prepare(data.images[i:min(i + batch, n)], pre["mean"], pre["std"], size)
               for i in range(0, n, batch)]
    labels = data.labels[:n]
    fast = optimize(model, compile=False)
    paths: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
        "baseline_fp32_nchw": ("fp32", model), "resnetkit_infer": (fast.precision, fast)}
    notes = []
    if compile or compile_pays(next(model.parameters()).device):
        paths["resnetkit_infer_compiled"] = (fast.precision, optimize(model, compile=True))
    if onnx:
        for name, (prec, run) in _engines(model, batches[0].shape[-1], notes).items():
            paths[name] = (prec, lambda x, run=run: torch.from_numpy(np.array(run(x.numpy()))))
    logits = {}
    with torch.inference_mode():
        for k, (_, fn) in paths.items():
            logits[k] = torch.cat([fn(x).float() for x in batches])
    ref = logits["baseline_fp32_nchw"]
    results = {}
    for k, out in logits.items():
        d = (out - ref).abs()
        results[k] = {"precision": paths[k][0],
                      "top1": (out.argmax(1) == labels).sum().item() / n,
                      "agreement_with_fp32": (out.argmax(1) == ref.argmax(1)).sum().item() / n,
                      "max_abs_diff": d.max().item(), "mean_abs_diff": d.mean().item()}
    c = model.cfg
    return {"checkpoint": str(checkpoint),
            "model": f"{c.block} blocks, depth {c.depth}, widths {list(c.widths)}",
            "dataset": dataset, "samples": n, "logit_scale": ref.abs().max().item(),
            "results": results, "notes": notes}

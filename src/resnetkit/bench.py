"""Side-by-side throughput: plain PyTorch vs resnetkit's paths vs ONNX Runtime/OpenVINO,
interleaved round by round in one process so machine noise hits every path alike."""
from __future__ import annotations

import functools
import os
import statistics
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import UserError
from .evaluate import eval_data, guard
from .geometry import check_input_size
from .infer import RunConfig, Runner, Source, open_runner, open_source
from .infer.backends.openvino import precisions as ov_precisions
from .infer.peers import MODES, Files, best_peer, last_line
from .infer.backends.onednn import OneDnnResNet
from .infer.backends.torch import compile_pays
from .infer.calibrate import calibration_set
from .infer.runner import installed, not_direct
from .infer.timing import LEAD_IN, interleaved
from .runtime import allocator_state, decide_channels_last, decide_precision, hardware
from .runtime.compiling import can_compile
from .runtime.fused_kernels import decide_fused
from .train.config import TrainConfig
from .train.optim import build_optimizer
from .train.step import TrainStep
from .untrusted import shown
from .zoo import create_model

__all__ = ["bench", "check", "hardware", "training_step"]

PEER_ROUNDS = 5  # timed calls of each peer configuration while searching


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


def _peers(model: torch.nn.Module, shape: tuple[int, ...], batches: list[torch.Tensor] | None,
           notes: list[str], mode: str = "search", static: bool = True,
           rounds: int = PEER_ROUNDS) -> tuple[dict[str, tuple[str, Runner]], dict[str, Any]]:
    """ONNX Runtime and OpenVINO at each precision they offer here (int8 where `batches`, its
    calibration images, are given), each in its fastest configuration for inputs of `shape`
    (mode "search", see infer.peers) or in its defaults on a `static` (else dynamic-batch)
    file (mode "defaults"). Returns ({name: (precision, runner)}, {name: {"config",
    "tried"}}). Engines that are not installed, or fail in every configuration, are left
    out with a note."""
    wanted = [("onnxruntime", "fp32"), *(("openvino", p) for p in ov_precisions())]
    if batches is not None:
        wanted += [("onnxruntime", "int8"), ("openvino", "int8")]
    for engine in ("onnxruntime", "openvino"):
        why = installed(engine, "fp32")
        if why:
            notes.append(f"{why}: {engine} skipped")
            wanted = [w for w in wanted if w[0] != engine]
    runners: dict[str, tuple[str, Runner]] = {}
    table: dict[str, Any] = {}
    files = Files(model, shape)
    try:
        for engine, prec in wanted:
            why = installed(engine, prec)
            if not why and (engine, prec) == ("onnxruntime", "int8") and mode == "defaults":
                why = installed("torch", "int8")  # its default is resnetkit's PT2E file
            if why:
                notes.append(f"{why}: {engine}_{prec} skipped")
                continue
            try:
                peer = best_peer(engine, prec, files, batches, mode=mode, rounds=rounds,
                                 static=static)
            except UserError:
                raise
            except Exception as e:  # every configuration failed: the engine's own error
                _peer_failed(f"{engine}_{prec}", e, notes)
                continue
            runners[peer.config.name] = (prec, Runner(engine, prec, peer.run))
            table[peer.config.name] = {"config": peer.config.describe(), "tried": peer.tried}
    finally:
        files.close()
    return runners, table


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
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    notes.append(f"{name} skipped: it failed on this machine"
                 f"{f' with ONEDNN_MAX_CPU_ISA={cap}' if cap else ''} ({last_line(e)})")


def _int8_path(base: torch.nn.Module, batches: list[torch.Tensor], notes: list[str],
               compiled: bool = True, source: Any = "the model") -> dict[str, tuple[str, Runner]]:
    """{"resnetkit_int8": ("int8", runner)}: resnetkit's int8 model calibrated on `batches`,
    as open_runner builds it by default (the direct oneDNN path where it runs, else the PT2E
    graph, compiled with frozen weights where the torch engine compiles); with the direct
    path, the PT2E graph beside it as "resnetkit_int8_pt2e". Empty, with a note, where
    torchao is not installed. A model whose outputs on the calibration images are not
    finite is a UserError naming `source`."""
    why = installed("torch", "int8")
    if why:
        notes.append(f"{why}: resnetkit_int8 skipped")
        return {}
    src = Source.of_model(base, name=source)
    out = {"resnetkit_int8": ("int8", open_runner(src, RunConfig(
        engine="torch", precision="int8", calibration=batches,
        compile="auto" if compiled else False)))}
    if isinstance(out["resnetkit_int8"][1].module, OneDnnResNet):
        out["resnetkit_int8_pt2e"] = ("int8", open_runner(src, RunConfig(
            engine="torch", precision="int8", calibration=batches, compile=compiled,
            direct=False)))
    return out


def _runners(src: Source, probe: torch.Tensor, compiled: bool, onnx: bool,
             batches: list[torch.Tensor] | None, notes: list[str], peers: dict[str, Any],
             static: bool = True, mode: str = "search") -> dict[str, tuple[str, Runner]]:
    """{name: (precision, runner)} of every inference path of `src`'s model, the eager fp32
    model first: resnetkit's torch engine (eager, compiled when `compiled`, and its direct
    oneDNN path, the default where it runs: "resnetkit_direct"), its int8
    path calibrated on `batches` (None: no int8), and where `onnx` the peer engines (see
    _peers: inputs of probe's shape, configurations searched or defaults by `mode`, their
    table put in `peers`) that run on `probe` (see _working). ONNX Runtime, OpenVINO and
    int8 run on the CPU only."""
    fast = open_runner(src, RunConfig(engine="torch", compile=False, direct=False))
    out = {"baseline_fp32_nchw": ("fp32", open_runner(src, RunConfig(reference=True))),
           "resnetkit_infer": (fast.precision, fast)}
    if compiled:
        out["resnetkit_infer_compiled"] = (fast.precision, open_runner(
            src, RunConfig(engine="torch", compile=True)))
    cpu = next(src.model.parameters()).device.type == "cpu"
    default = open_runner(src, RunConfig(engine="torch")) if cpu else None
    if default is not None and isinstance(default.module, OneDnnResNet):
        out["resnetkit_direct"] = (default.precision, default)
        shape = tuple(probe.shape)
        notes.append(f"resnetkit_direct: activations {default.module.layout_of(shape)}, runs "
                     f"of {default.module.chunk_of(shape)} images")
    elif default is not None:
        why = not_direct(src.model, default.precision, RunConfig(engine="torch"))
        notes.append(f"resnetkit_direct skipped: {why or 'it failed to build here'}")
    if batches is not None and cpu:
        out.update(_int8_path(src.model, batches, notes, compiled, src.name))
    elif batches is not None:
        notes.append("int8 is timed on the CPU only (use --device cpu)")
    if onnx and cpu:
        runners, table = _peers(src.model, tuple(probe.shape), batches, notes, mode, static)
        peers.update(table)
        out.update(_working(runners, probe, notes))
    elif onnx:
        notes.append("ONNX Runtime and OpenVINO are timed on the CPU only (use --device cpu)")
    return out


def _paths(model: str, x: torch.Tensor, y: torch.Tensor, image_size: int, train: bool,
           onnx: bool, compile: bool, notes: list[str], int8: bool = True,
           steps: dict[str, TrainStep] | None = None, peers: dict[str, Any] | None = None,
           peer_search: str = "search", **build: Any
           ) -> tuple[dict[str, Callable[[], Any]], dict[str, str], bool]:
    """Every timed path ({name: run}), its precision, and whether the torch engine compiles
    by default here; the peer engines' configurations go into `peers` (see _runners).
    `build` holds create_model's in_chans and num_classes."""
    dev = x.device
    base = create_model(model, **build).to(dev).eval()
    auto_compiles = compile_pays(dev)
    # random weights, so random calibration images: the speed does not depend on them
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(x.shape, generator=gen) for _ in range(2)] if int8 else None
    runners = _runners(Source.of_model(base), x, compile or auto_compiles, onnx, batches,
                       notes, {} if peers is None else peers, mode=peer_search)

    def infer(run):
        def timed():
            with torch.inference_mode():
                run(x)
        return timed
    paths = {k: infer(run) for k, (_, run) in runners.items()}
    precision = {k: p for k, (p, _) in runners.items()}
    if train:
        trained = _train_paths(model, x, y, compile, {} if steps is None else steps, **build)
        for name, (run, prec) in trained.items():
            paths[name], precision[name] = run, prec
    return paths, precision, auto_compiles


def _train_paths(model: str, x: torch.Tensor, y: torch.Tensor, compile: bool,
                 steps: dict[str, TrainStep], **build: Any
                 ) -> dict[str, tuple[Callable[[], None], str]]:
    """{name: (run, precision)} of the training steps: plain PyTorch in eager fp32 NCHW (the
    baseline), and the trainer's own step (train.TrainStep with the trainer's optimizer) at
    the precision and layout the trainer picks here, eager (its BN, sums and ReLUs by the
    fused kernels where the trainer fuses them), and compiled where torch.compile can build
    kernels (the trainer compiles runs long enough to pay for it). The trainer's
    steps are also put in `steps`, by name."""
    dev = x.device
    tb = create_model(model, **build).to(dev).train()
    ob = torch.optim.SGD(tb.parameters(), lr=0.01, momentum=0.9)
    out = {"train_baseline_fp32_nchw": (training_step(tb, ob, x, y, False), "fp32")}
    prec = decide_precision("auto", dev, choices=("bf16", "fp32"))
    cl = decide_channels_last("auto", prec, dev)  # what the trainer picks
    fmt = torch.channels_last if cl else torch.contiguous_format
    xt = x.contiguous(memory_format=fmt)
    for compiled in (False, True) if compile or can_compile(dev) else (False,):
        m = create_model(model, **build).to(dev, memory_format=fmt).train()
        fused, _ = decide_fused("auto", dev, cl, compiled)  # what the trainer picks
        step = TrainStep(m, m, build_optimizer(m, TrainConfig(lr=0.01)), None, dev, prec,
                         compile=compiled, fused=fused)
        name = "train_resnetkit_compiled" if compiled else "train_resnetkit"
        out[name], steps[name] = (functools.partial(step, [(xt, y)]), prec), step
    return out


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


def _train_targets(results: dict[str, dict[str, Any]], hw: dict[str, Any]) -> dict[str, Any]:
    """The training step's targets here, and whether the fastest of the trainer's steps meets
    them: >= 2.5x eager fp32 NCHW where the CPU has native bf16, >= 1.5x elsewhere (on CUDA:
    none), and >= 0.6 of the peak at its precision on CPUs without AMX (AMX's tile peak is
    far above what convolutions of a few dozen channels reach: reported, no target)."""
    best = max((k for k in results if k.startswith("train_resnetkit")),
               key=lambda k: results[k]["speedup_paired"])
    r, cpu = results[best], "peak_int8_gops" in hw
    speedup = (2.5 if hw.get("avx512_bf16") or hw.get("amx_bf16") else 1.5) if cpu else None
    peak = 0.6 if cpu and not hw.get("amx_bf16") else None
    return {"path": best, "speedup_paired": r["speedup_paired"], "speedup_target": speedup,
            "speedup_met": None if speedup is None else r["speedup_paired"] >= speedup,
            "fraction_of_peak": r["fraction_of_peak"], "fraction_of_peak_target": peak,
            "fraction_of_peak_met": None if peak is None or r["fraction_of_peak"] is None
            else r["fraction_of_peak"] >= peak}


def _inference_targets(results: dict[str, dict[str, Any]], hw: dict[str, Any],
                       capped: bool = False) -> dict[str, Any]:
    """resnetkit's default inference path (the direct oneDNN path where it runs, else compiled
    where timed) and its int8 path against
    the fastest peer engine at the same precision: the median of the per-round ratios
    (target >= 1.0), and the fraction of the peak at that precision (target >= 0.9 on CPUs
    without AMX; AMX's tile peak is reported, with no target, as for training). `capped`
    (ONEDNN_MAX_CPU_ISA set): only the peers that follow the cap (OpenVINO) are compared,
    as ONNX Runtime's own kernels run the whole instruction set ("left_out" says so)."""
    default = next(k for k in ("resnetkit_direct", "resnetkit_infer_compiled", "resnetkit_infer")
                   if k in results)
    out = {}
    for kind, ours in (("default", default), ("int8", "resnetkit_int8")):
        if ours not in results:
            continue
        prec = results[ours]["precision"]
        engines = ("openvino",) if capped else ("onnxruntime", "openvino")
        peers = [k for k, r in results.items() if r["precision"] == prec
                 and k.split("_")[0] in engines]
        best = max(peers, key=lambda k: results[k]["img_s"], default=None)
        ratio = None if best is None else statistics.median(
            b / a for a, b in zip(results[ours]["round_ms"], results[best]["round_ms"]))
        frac = results[ours]["fraction_of_peak"]
        peak_target = 0.9 if "peak_int8_gops" in hw and not hw.get("amx_bf16") else None
        out[kind] = {"path": ours, "precision": prec, "best_peer": best,
                     "ratio_paired": ratio, "ratio_target": 1.0,
                     "ratio_met": None if ratio is None else ratio >= 1.0,
                     "fraction_of_peak": frac, "fraction_of_peak_target": peak_target,
                     "fraction_of_peak_met": None if peak_target is None or frac is None
                     else frac >= peak_target}
        if capped:
            out[kind]["left_out"] = "onnxruntime (its kernels do not follow ONEDNN_MAX_CPU_ISA)"
    return out


def bench(model: str = "resnet50", batch: int = 16, image_size: int = 224, threads: int = 0,
          rounds: int = 7, warmup: int = 2, in_chans: int = 3, num_classes: int = 1000,
          train: bool = True, onnx: bool = True, compile: bool = False,
          device: str = "auto", int8: bool = True, peer_search: str = "search"
          ) -> dict[str, Any]:
    """Median images/s and ms per batch of each path, their spread, speed-ups against the
    eager fp32 NCHW baseline (ratio of medians, and the median of the per-round ratios) and
    achieved FLOP/s as a fraction of peak. device: "auto" (CUDA when there is one), "cpu" or
    "cuda[:N]"; ONNX Runtime and OpenVINO run on the CPU only, so they are timed only there.
    int8: also time the int8 paths (CPU only; calibrated on random images, as the weights
    are random). An int8 path's "gflops" counts int8 operations, its fraction is of the
    int8 peak. The peak's clock is measured where the OS does not report it (see
    runtime.hardware). peer_search: "search" times each peer engine's configurations first
    and keeps the fastest, "defaults" takes their defaults (see infer.peers); "peers" in
    the result names each one's configuration and, when searched, the table of what was
    tried. Every timed call follows LEAD_IN untimed calls of the same path (see
    infer.timing)."""
    if peer_search not in MODES:
        raise UserError(f"peer_search must be one of {', '.join(MODES)}, got {peer_search!r}")
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
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if cap and onnx:
        notes.append(f"ONEDNN_MAX_CPU_ISA={cap} caps PyTorch's and OpenVINO's oneDNN; ONNX "
                     f"Runtime's own kernels do not follow it, so its figures are this CPU's "
                     f"full instruction set")
    steps: dict[str, TrainStep] = {}
    peers: dict[str, Any] = {}
    paths, precision, auto_compiles = _paths(model, x, y, image_size, train, onnx, compile,
                                             notes, int8, steps, peers, peer_search, **build)
    times = interleaved(paths, rounds, warmup, sync=torch.cuda.synchronize
                        if dev.type == "cuda" else None)
    hw = hardware(dev, measure=True)
    results = _summarise(times, precision, batch, macs, hw)
    compiled = steps.get("train_resnetkit_compiled")
    extra = {"train_compile_s": compiled.compile_s if compiled else None,
             "train_targets": _train_targets(results, hw)} if steps else {}
    return {"model": model, "batch": batch, "image_size": image_size, "in_chans": in_chans,
            "rounds": rounds, "macs_per_image": macs, "hardware": hw,
            "results": results, **extra,
            "inference_targets": _inference_targets(results, hw, capped=bool(cap)),
            "peers": peers,
            "peer_search": peer_search, "lead_in_calls": LEAD_IN,
            "optimize_default": "resnetkit_direct" if "resnetkit_direct" in results else
            "resnetkit_infer_compiled" if auto_compiles else "resnetkit_infer",
            "allocator": allocator_state(),
            "notes": notes, "pid": os.getpid()}


def check(checkpoint: str | Path, dataset: str = "fashion-mnist", data_dir: str | None = None,
          batch: int = 500, onnx: bool = True, compile: bool = False,
          limit: int = 0, int8: bool = True, calibration_images: int = 512) -> dict[str, Any]:
    """The accuracy guard: every fast path's logits against the eager fp32 model's on a real
    test set, for a trained checkpoint. Reports per path its top-1 accuracy, its top-1
    agreement with fp32 (fraction of images with the same predicted class) and the max and
    mean absolute logit difference (see evaluate.guard). int8: also the int8 paths,
    calibrated on `calibration_images` images of the dataset's training split in the
    checkpoint's preprocessing (never on the test images they are judged on)."""
    if batch < 1:
        raise UserError(f"batch size must be >= 1, got {batch}")
    notes: list[str] = []
    src = open_source(checkpoint)
    if src.model is None:
        raise UserError(f"{shown(checkpoint)} is an exported file; bench --check compares the "
                        f"engines of the checkpoint it was exported from")
    pre, cfg, classes = src.meta.need_preprocess(), src.model.cfg, src.meta.classes
    data, left_out = eval_data(dataset, "test", data_dir, pre, cfg.in_chans, classes,
                               src.model.num_classes, limit)
    size = pre["image_size"] or data.shape[-1]  # the size the model sees
    batches = None
    if int8:
        batches = calibration_set(f"{dataset}:{calibration_images}", cfg.in_chans, size, pre,
                                  data_dir=data_dir, classes=classes)
        notes.append(f"int8 calibrated on {calibration_images} images of the {dataset} "
                     f"training split")
    probe = torch.zeros(2, cfg.in_chans, size, size)
    peers: dict[str, Any] = {}
    paths = _runners(src, probe, compile or compile_pays(torch.device("cpu")), onnx, batches,
                     notes, peers, static=False, mode="defaults")
    r = guard(checkpoint, cfg, dataset, "test", data, paths, pre, batch, left_out)
    r["notes"], r["peers"] = notes, peers
    return r

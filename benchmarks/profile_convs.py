"""Which convolutions hold a path back: resnetkit's torch path as open_runner builds it (the
direct oneDNN path where it runs, else compiled; `--pytorch` for the compiled PyTorch path),
oneDNN's own timing of every primitive it runs (its verbose mode), beside OpenVINO's (its per-node performance counters)
on the same model, precision and batch. Convolutions are grouped by kind (the stem, 1x1,
3x3); each group's time per batch, GFLOP/s and fraction of the measured peak at that
precision, and the time outside convolutions. Prints JSON.

    python benchmarks/profile_convs.py [--model resnet50] [--batch 16] [--image-size 224]
                                       [--precision int8|bf16|fp32] [--iters 5]
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict

import numpy as np
import torch

import resnetkit as rk
from common import model_parser
from resnetkit.infer import RunConfig, Source, open_runner
from resnetkit.infer.backends import onednn
from resnetkit.infer.backends import openvino as ov_backend
from resnetkit.infer.peers import Files, best_peer
from resnetkit.infer.timing import interleaved
from resnetkit.runtime import hardware

WARMUP = 5  # the first calls compile, and the next few still run slow
PEAK_KEY = {"fp32": "peak_fp32_gflops", "bf16": "peak_bf16_gflops", "int8": "peak_int8_gops"}
SHAPE = re.compile(r"mb(\d+)(?:_g\d+)?_ic(\d+)oc(\d+)_ih\d+oh(\d+)kh(\d+)\S*?_iw\d+ow(\d+)kw(\d+)")


def median_ms(fn, iters: int) -> float:
    """The median ms of `iters` calls of fn, after WARMUP calls."""
    return statistics.median(interleaved({"fn": fn}, iters, WARMUP, lead_in=0)["fn"]) * 1e3


def kind(ic: int, kh: int, kw: int) -> str:
    return "stem" if ic <= 4 else "1x1" if kh == kw == 1 else f"{kh}x{kw}"


def torch_side(runner, x: torch.Tensor, iters: int) -> tuple[float, dict, dict]:
    """(median ms per batch, {kind: ms per batch}, {kind: MACs per batch}) of the runner."""
    with torch.inference_mode():
        total = median_ms(lambda: runner(x), iters)
    ms, macs = defaultdict(float), defaultdict(float)
    import io
    import os
    # oneDNN writes its verbose lines to the process's stdout (fd 1): caught in a pipe file
    r, w = os.pipe()
    saved = os.dup(1)
    sys.stdout.flush()
    os.dup2(w, 1)
    try:
        direct = isinstance(runner.module, onednn.OneDnnResNet)
        if direct:
            onednn.set_verbose(2)
        with torch.inference_mode(), torch.backends.mkldnn.verbose(
                torch.backends.mkldnn.VERBOSE_ON):
            runner(x)
            runner(x)
        sys.stdout.flush()
    finally:
        if direct:
            onednn.set_verbose(0)
        os.dup2(saved, 1)
        os.close(w)
    text = io.open(r, encoding="utf-8", errors="replace").read()
    for line in text.splitlines():
        f = line.split(",")
        # "onednn_verbose,[v1,]primitive,exec,cpu,convolution,..." (newer oneDNN) or
        # "onednn_verbose,exec,cpu,convolution,..." (3.2, the direct path's)
        at = f.index("exec") if "exec" in f[:4] else -1
        if len(f) < 10 or at < 0 or f[at + 2] != "convolution":
            continue
        m = SHAPE.search(line)
        if not m:
            continue
        mb, ic, oc, oh, kh, ow, kw = map(int, m.groups())
        k = kind(ic, kh, kw)
        ms[k] += float(f[-1]) / 2
        macs[k] += mb * ic * oc * oh * ow * kh * kw / 2
    return total, dict(ms), dict(macs)


def openvino_side(run, request_of, x: np.ndarray, iters: int) -> tuple[float, dict]:
    total = median_ms(lambda: run(x), iters)
    ms = defaultdict(float)
    for p in request_of().profiling_info:
        t = p.real_time.total_seconds() * 1e3
        if p.node_type != "Convolution" or t <= 0:
            continue
        ms["stem" if p.exec_type.endswith("_i8") or p.exec_type.endswith("_f32_stem")
           else "1x1" if "_1x1_" in p.exec_type else "other"] += t
    return total, dict(ms)


def main() -> None:
    p = model_parser(__doc__)
    p.add_argument("--iters", type=int, default=11)
    p.add_argument("--pytorch", action="store_true",
                   help="profile the compiled PyTorch path instead of the direct one")
    a = p.parse_args()
    rk.tune_allocator()
    torch.manual_seed(0)
    model = rk.create_model(a.model, num_classes=a.num_classes).eval()
    shape = (a.batch, 3, a.image_size, a.image_size)
    x = torch.randn(shape)
    cal = [torch.randn(shape) for _ in range(2)] if a.precision == "int8" else None
    runner = open_runner(Source.of_model(model), RunConfig(
        engine="torch", precision=a.precision, calibration=cal,
        compile=True if a.pytorch else "auto", direct=False if a.pytorch else "auto"))
    total, ms, macs = torch_side(runner, x, a.iters)
    peak = hardware(measure=True)[PEAK_KEY[a.precision]]

    def rows(times):
        return {k: {"ms": t, "gflops": 2 * macs.get(k, 0) / t / 1e6 if t else None,
                    "fraction_of_peak": 2 * macs.get(k, 0) / t / 1e6 / peak if t else None}
                for k, t in sorted(times.items())}
    out = {"model": a.model, "batch": a.batch, "image_size": a.image_size,
           "precision": a.precision, "peak_gflops": peak,
           "resnetkit": {"path": type(runner.module).__name__, "ms_per_batch": total, "convolutions": rows(ms),
                         "outside_convolutions_ms": total - sum(ms.values())}}
    # OpenVINO in bench's default configuration, its counters on
    original = ov_backend.compiled
    holder = {}

    def counted(graph, precision="fp32", threads=0, fixed=None, hint="LATENCY"):
        if fixed is not None:
            graph = graph.clone()
            graph.reshape(list(fixed))
        config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "fp32" else "bf16",
                  "PERFORMANCE_HINT": hint, "PERF_COUNT": True}
        req = ov_backend.core().compile_model(graph, "CPU", config).create_infer_request()
        holder["req"] = req

        def run(arr):
            req.infer({0: arr}, share_inputs=True)
            return req.get_output_tensor(0).data
        return run
    ov_backend.compiled = counted
    files = Files(model, shape)
    try:
        peer = best_peer("openvino", a.precision, files, cal, mode="defaults")
    finally:
        ov_backend.compiled = original
        files.close()
    total, ov_ms = openvino_side(peer.run, lambda: holder["req"], x.numpy(), a.iters)
    # OpenVINO names 3x3 kernels and strided 1x1s alike; the 1x1 kernels' FLOPs are those
    # of every 1x1 conv in torch's count
    ov_rows = {}
    for k, t in ov_ms.items():
        flop = 2 * (macs.get(k, 0) if k != "other" else
                    sum(v for kk, v in macs.items() if kk not in ("stem", "1x1")))
        ov_rows[k] = {"ms": t, "gflops": flop / t / 1e6, "fraction_of_peak": flop / t / 1e6 / peak}
    out["openvino"] = {"ms_per_batch": total, "config": peer.config.describe(),
                       "convolutions": ov_rows,
                       "outside_convolutions_ms": total - sum(ov_ms.values())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

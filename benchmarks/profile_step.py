"""Where the trainer's step spends its time, and how far each kind of kernel is from its own
peak. Prints JSON:

- "kinds": torch.profiler's self time of the trainer's step (train.TrainStep, the precision
  and memory format the trainer picks), eager and compiled, per op kind: conv forward, conv
  backward (data and weights together, as the profiler sees them), BN forward and backward,
  other elementwise ops (ReLU, additions), the optimizer, the rest.
- "convs": every convolution of the model timed alone at its own shape: forward,
  backward-data and backward-weights, each with its FLOP/s and fraction of the CPU's peak at
  the step's precision (runtime.hardware, measured).
- "memory": the copy bandwidth of a large tensor (the bound of BN, ReLU and additions) and the
  bytes the step's eager elementwise ops move at least, so their time can be read against it.
- "data_ms": a Fashion-MNIST batch's augmentation as the trainer feeds it, against the step.

    python benchmarks/profile_step.py [--model resnet20] [--batch 256] [--image-size 28]
        [--in-chans 1] [--num-classes 10] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from resnetkit.runtime import decide_channels_last, decide_precision, hardware
from resnetkit.runtime.compiling import can_compile
from resnetkit.train.config import TrainConfig
from resnetkit.train.feed import Feed
from resnetkit.train.optim import build_optimizer
from resnetkit.runtime.fused_kernels import decide_fused
from resnetkit.train.step import TrainStep
from resnetkit.zoo import create_model

KINDS = {"aten::mkldnn_convolution": "conv forward", "aten::convolution_backward": "conv backward",
         "aten::native_batch_norm": "bn forward", "aten::native_batch_norm_backward": "bn backward",
         "aten::threshold_backward": "elementwise", "aten::clamp_min_": "elementwise",
         "aten::relu_": "elementwise", "aten::add_": "elementwise", "aten::add": "elementwise",
         "aten::_fused_sgd_": "optimizer",
         # resnetkit's fused kernels (fused.py), where the trainer takes them
         "_BNAct": "bn forward", "_BNActBackward": "bn backward", "_BNActPool": "bn forward",
         "_BNActPoolBackward": "bn backward", "_MaxPool2": "elementwise",
         "_MaxPool2Backward": "elementwise"}


def median_s(fn, reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def by_kind(step, reps: int = 3) -> dict[str, float]:
    """ms per step of each op kind (self CPU time); compiled graphs are "fused (compiled)"."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            step()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        kind = KINDS.get(e.key, "fused (compiled)" if "CompiledFxGraph" in e.key else "other")
        out[kind] = out.get(kind, 0.0) + e.self_cpu_time_total / 1e3 / reps
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def conv_inputs(model, x) -> list[tuple[torch.nn.Conv2d, torch.Size]]:
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0].shape)))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def conv_table(model, x, dtype, fmt, peak_gflops: float) -> list[dict]:
    """Each conv alone: forward, backward-data, backward-weights; ms and fraction of peak."""
    rows = []
    for conv, shape in conv_inputs(model, x):
        inp = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
        w = conv.weight.detach().to(dtype).contiguous(memory_format=fmt)
        out = F.conv2d(inp, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        grad = torch.randn_like(out)
        macs = out.numel() * w[0].numel()
        args = (grad, inp, w, None, conv.stride, conv.padding, conv.dilation, False, (0, 0),
                conv.groups)
        timed = {"forward": lambda: F.conv2d(inp, w, None, conv.stride, conv.padding,
                                             conv.dilation, conv.groups),
                 "backward_data": lambda: torch.ops.aten.convolution_backward(
                     *args, (True, False, False)),
                 "backward_weights": lambda: torch.ops.aten.convolution_backward(
                     *args, (False, True, False))}
        # the first conv's backward-data is never run in training (the images need no grad)
        row = {"in": list(shape[1:]), "out_channels": conv.out_channels,
               "kernel": conv.kernel_size[0], "stride": conv.stride[0], "first": not rows}
        for name, fn in timed.items():
            s = median_s(fn)
            row[f"{name}_ms"] = s * 1e3
            row[f"{name}_fraction_of_peak"] = 2 * macs / s / 1e9 / peak_gflops
        rows.append(row)
    return rows


def bandwidth_gbs() -> float:
    """GB/s of copying a 256 MB tensor (read + write)."""
    a = torch.empty(64 * 2 ** 20)
    b = torch.empty_like(a)
    return 2 * a.numel() * 4 / median_s(lambda: b.copy_(a)) / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args()
    dev = torch.device("cpu")
    prec = decide_precision("auto", dev, choices=("bf16", "fp32"))
    fmt = torch.channels_last if decide_channels_last("auto", prec, dev) else torch.contiguous_format
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    build = dict(in_chans=a.in_chans, num_classes=a.num_classes)
    x = torch.randn(a.batch, a.in_chans, a.image_size, a.image_size).contiguous(memory_format=fmt)
    y = torch.randint(0, a.num_classes, (a.batch,))
    hw = hardware(dev, measure=True)
    peak = hw["peak_bf16_gflops" if prec == "bf16" else "peak_fp32_gflops"]
    out = {"model": a.model, "batch": a.batch, "image_size": a.image_size, "precision": prec,
           "channels_last": fmt == torch.channels_last, "cpu": hw["device"], "peak_gflops": peak,
           "kinds": {}, "step_ms": {}}
    for compiled in (False, True) if can_compile(dev) and not a.no_compile else (False,):
        m = create_model(a.model, **build).to(memory_format=fmt).train()
        fused, _ = decide_fused("auto", dev, fmt == torch.channels_last, compiled)  # as the trainer
        step = TrainStep(m, m, build_optimizer(m, TrainConfig(lr=0.01)), None, dev, prec,
                         compile=compiled, fused=fused)
        run = lambda: step([(x, y)])  # noqa: E731
        name = "compiled" if compiled else "eager"
        run()
        out["step_ms"][name] = median_s(run) * 1e3
        out["kinds"][name] = by_kind(run)
    model = create_model(a.model, **build).to(memory_format=fmt)
    out["convs"] = conv_table(model, x, dtype, fmt, peak)
    # BN forward reads its input twice (statistics, then normalise) and writes once; backward
    # reads the output's gradient and the input twice and writes once; ReLU and additions
    # once each way: at least 7 passes over every BN's activations a step
    acts = sum(s.numel() // s[0] * a.batch for _, s in conv_inputs(model, x))
    out["memory"] = {"copy_gbs": bandwidth_gbs(),
                     "elementwise_bytes_at_least": 7 * acts * dtype.itemsize}
    out["memory"]["elementwise_ms_at_copy_speed"] = \
        out["memory"]["elementwise_bytes_at_least"] / out["memory"]["copy_gbs"] / 1e6
    # a batch as the trainer feeds it (Fashion-MNIST, crop + flip + random erasing)
    feed = Feed(TrainConfig(crop_padding=2, hflip=True, random_erasing=0.3))
    idx = torch.arange(a.batch)
    out["data_ms"] = median_s(lambda: feed.augment(feed.train.images[idx], 0, idx, 0).contiguous(
        memory_format=fmt)) * 1e3
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

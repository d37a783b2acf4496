"""Where the time goes: torch.profiler over resnetkit's inference path (and optionally the
tuned training step) for a model, batch and image size. Prints JSON: the ops with the most
self CPU time, their share of the total, call counts and the op's input dtypes.

    python benchmarks/profile_paths.py [--model resnet50] [--batch 16] [--image-size 224] [--train]
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

import resnetkit as rk
from resnetkit.bench import training_step
from resnetkit.infer.optimize import optimize
from resnetkit.runtime import has_native_bf16


def top_ops(prof, n: int) -> list[dict]:
    events = prof.key_averages(group_by_input_shape=False)
    total = sum(e.self_cpu_time_total for e in events) or 1
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in rows]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--train", action="store_true", help="also profile the tuned training step")
    a = p.parse_args()
    rk.tune_allocator()  # as the CLI does
    # name inductor's generated kernels in the profile instead of one opaque graph call
    torch._inductor.config.cpp.enable_kernel_profile = True
    model = rk.create_model(a.model, in_chans=a.in_chans, num_classes=a.num_classes).eval()
    x = torch.randn(a.batch, a.in_chans, a.image_size, a.image_size)
    fast = optimize(model)
    out = {"model": a.model, "batch": a.batch, "image_size": a.image_size,
           "threads": torch.get_num_threads(), "precision": fast.precision,
           "compiled": fast.compiled, "frozen": fast.frozen}
    with torch.inference_mode():
        for _ in range(2):
            fast(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.iters):
                fast(x)
    out["inference"] = top_ops(prof, a.top)
    if a.train:
        bf16 = has_native_bf16(x.device)
        m = rk.create_model(a.model, in_chans=a.in_chans, num_classes=a.num_classes).train()
        m = m.to(memory_format=torch.channels_last) if bf16 else m
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        xt = x.contiguous(memory_format=torch.channels_last) if bf16 else x
        y = torch.randint(0, a.num_classes, (a.batch,))
        step = training_step(m, opt, xt, y, bf16)
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.iters):
                step()
        out["train"] = top_ops(prof, a.top)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

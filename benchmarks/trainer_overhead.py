"""Trainer bookkeeping cost: Trainer.fit-style steps vs a bare PyTorch loop, side by side.

Both run the same model, batch, precision and memory format on the same in-memory
Fashion-MNIST batches, interleaved round by round so machine noise hits both alike.
Prints JSON: median images/s of each and the ratio trainer / bare.

    python benchmarks/trainer_overhead.py [--model resnet20] [--batch 256] [--rounds 5] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import resnetkit as rk
from resnetkit.train import Trainer, build_config


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--precision", default="auto")
    a = p.parse_args()
    cfg = build_config(None, model=a.model, batch_size=a.batch, precision=a.precision,
                       train_subset=a.batch * a.steps, epochs=1000, out_dir="/tmp/rk-bench",
                       plots=False)
    tr = Trainer(cfg, quiet=True)
    fmt = torch.channels_last if tr.channels_last else torch.contiguous_format
    bare = rk.create_model(a.model, in_chans=1, num_classes=10).to(memory_format=fmt)
    opt = torch.optim.SGD(bare.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tr.precision)
    data = tr.train_data

    def bare_epoch() -> float:
        bare.train()
        t = time.perf_counter()
        for i in range(a.steps):
            x = (data.images[i * a.batch:(i + 1) * a.batch].float() / 255 - tr.mean[0]) / tr.std[0]
            x = x.contiguous(memory_format=fmt)
            y = data.labels[i * a.batch:(i + 1) * a.batch]
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(bare(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return a.steps * a.batch / (time.perf_counter() - t)

    def trainer_epoch() -> float:
        # One epoch of the trainer's own loop (augmentation off, evaluation excluded).
        tr.epoch, tr.step_in_epoch = 0, 0
        _, _, seen, seconds = tr.train_epoch()
        return seen / seconds

    bare_epoch(), trainer_epoch()  # warm-up
    b, t = [], []
    for _ in range(a.rounds):
        b.append(bare_epoch())
        t.append(trainer_epoch())
    mb, mt = statistics.median(b), statistics.median(t)
    print(json.dumps({"model": a.model, "batch": a.batch, "precision": tr.precision,
                      "channels_last": tr.channels_last, "threads": torch.get_num_threads(),
                      "bare_img_s": b, "trainer_img_s": t, "bare_median": mb,
                      "trainer_median": mt, "ratio_trainer_over_bare": mt / mb}, indent=1))


if __name__ == "__main__":
    main()

"""Transfer on real data, no download: pretrain ResNet-20 on Fashion-MNIST classes 0-4
(recipe fashion-mnist-0to4), fine-tune it on 100 images per class of classes 5-9 (recipe
fashion-mnist-transfer), and train the same network from scratch on the same 500 images for
the same epochs. Prints JSON: both test accuracies on classes 5-9 (all 5,000 test images of
those classes), the gap and the times.

    python benchmarks/transfer.py [--out runs/transfer] [--scratch-epochs N]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from resnetkit.runtime import hardware
from resnetkit.train import Trainer, build_config


def run(recipe: str, out: Path, **values) -> tuple[dict, float]:
    t = time.perf_counter()
    result = Trainer(build_config(recipe, **values, out_dir=str(out), plots=False),
                     quiet=True).fit()
    return result, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/transfer")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    pre, t_pre = run("fashion-mnist-0to4", out, seed=a.seed)
    ft, t_ft = run("fashion-mnist-transfer", out, init=str(out / "fashion-mnist-0to4"),
                   name="transfer", seed=a.seed)
    scratch, t_scratch = run("fashion-mnist-transfer", out, init="", head_lr_mult=1.0,
                             name="scratch", seed=a.seed)
    print(json.dumps({
        "pretrain_0to4": {"test_top1": pre["test"]["top1"], "seconds": t_pre},
        "finetune_5to9": {"test_top1": ft["test"]["top1"], "seconds": t_ft},
        "scratch_5to9": {"test_top1": scratch["test"]["top1"], "seconds": t_scratch},
        "gap_points": 100 * (ft["test"]["top1"] - scratch["test"]["top1"]),
        "train_images": 500, "test_images": ft["test"]["samples"],
        "hardware": hardware()}, indent=1))


if __name__ == "__main__":
    main()

"""Training throughput with 1..N processes on this machine (DDP under torchrun), same global
batch, side by side: each configuration trains one epoch on a Fashion-MNIST subset, in
alternation, `--rounds` times. Prints JSON: images/s per run (the trainer's own all-reduced
figure from metrics.jsonl), medians, and speed-up / scaling efficiency against 1 process.

    python benchmarks/ddp_scaling.py [--procs 1 2] [--samples 15360] [--global-batch 256]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(nproc: int, a: argparse.Namespace, out: Path, name: str) -> float:
    cmd = [sys.executable, "-m", "resnetkit", "train", "--nproc", str(nproc), "--model", a.model,
           "--epochs", "1", "--train_subset", str(a.samples), "--test_subset", "1000",
           "--global_batch", str(a.global_batch), "--plots", "false", "--out_dir", str(out),
           "--name", name, "--precision", a.precision]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    row = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[-1])
    return row["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--samples", type=int, default=15360)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--precision", default="auto")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    out = Path(tempfile.mkdtemp())
    ips: dict[int, list[float]] = {n: [] for n in a.procs}
    for r in range(a.rounds):
        for n in a.procs:
            ips[n].append(run(n, a, out, f"p{n}-r{r}"))
    med = {n: statistics.median(v) for n, v in ips.items()}
    one = med.get(1)
    print(json.dumps({"model": a.model, "global_batch": a.global_batch, "samples": a.samples,
                      "precision": a.precision, "img_s": ips, "median_img_s": med,
                      "speedup_vs_1": {n: m / one for n, m in med.items()} if one else None,
                      "scaling_efficiency": {n: m / one / n for n, m in med.items()} if one else None},
                     indent=1))


if __name__ == "__main__":
    main()

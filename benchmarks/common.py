"""What the benchmark scripts share: the arguments that say which model runs on what input."""
from __future__ import annotations

import argparse


def model_parser(doc: str, precision: str = "int8") -> argparse.ArgumentParser:
    """A parser with --model, --batch, --image-size, --num-classes and --precision (int8,
    bf16 or fp32; default `precision`), described by the first line of `doc`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--precision", default=precision, choices=["int8", "bf16", "fp32"])
    return p

"""Evaluate a model, or a checkpoint, on a dataset: top-1, top-5, loss, per-class accuracy,
the confusion matrix; and the agreement of other inference paths with a checkpoint's own
fp32 model (`resnetkit eval` and `resnetkit bench --check` both call `evaluate_checkpoint`)."""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .data import ArrayDataset, StreamedFolder, load_dataset, materialize, restrict_to_classes
from .data import transforms as T
from .errors import UserError
from .model import ResNet
from .weights.sources import load_source

# all_sum: sums tensors over the processes of a distributed run (see train.distributed)
Reduce = Callable[..., list[torch.Tensor]]
# variants(model, image_size) -> {name: (precision, callable on a float batch)}
Variants = Callable[[ResNet, int], dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]]]


def preprocess(images: torch.Tensor, mean, std, image_size: int = 0) -> torch.Tensor:
    """uint8 images -> normalised float batch at the eval size (resize + centre crop)."""
    x = images.float() / 255
    if image_size and x.shape[-1] != image_size:
        x = T.resize_center_crop(x, image_size)
    return T.normalize(x, mean, std)


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on the device, or nothing for fp32/fp64."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


def _shard(n: int, batch_size: int, shard: tuple[int, int]) -> list[torch.Tensor]:
    """The index batches of process `rank` of `world` (contiguous shares of the dataset)."""
    rank, world = shard
    share = torch.tensor_split(torch.arange(n), world)[rank]
    lo, hi = (int(share[0]), int(share[-1]) + 1) if len(share) else (0, 0)
    return [torch.arange(i, min(i + batch_size, hi)) for i in range(lo, hi, batch_size)]


def evaluate(model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
             data: ArrayDataset | StreamedFolder, mean, std, image_size: int = 0,
             batch_size: int = 1024, precision: str = "fp32", channels_last: bool = False,
             device: torch.device | str = "cpu", shard: tuple[int, int] = (0, 1),
             reduce: Reduce | None = None, tta_flip: bool = False,
             keep_logits: bool = False) -> dict[str, Any]:
    """Top-1, top-5, loss, per-class accuracy and the confusion matrix on a dataset.

    model: a module or any callable from a float batch to logits. Under DDP each process
    evaluates its `shard` (rank, world) and `reduce` sums the counts over processes. With
    `tta_flip`, the class probabilities of each image and its mirror image are averaged.
    keep_logits adds "logits" (N, classes) in fp32, in dataset order (one process only)."""
    device = torch.device(device)
    n_cls = len(data.classes)
    conf = torch.zeros(n_cls, n_cls, dtype=torch.long)
    sums = torch.zeros(2, dtype=torch.float64)  # loss, top-5 hits
    if isinstance(model, torch.nn.Module):
        model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dtype = torch.float64 if precision == "fp64" else torch.float32
    ranges = _shard(len(data), batch_size, shard)
    kept = []
    with torch.no_grad():
        for idx, images in zip(ranges, data.batches(ranges)):
            x = preprocess(images, mean, std, image_size)
            y = data.labels[idx]
            x = x.to(device, dtype, memory_format=fmt)
            with autocast(device, precision):
                out = model(x).float().cpu()
                if tta_flip:  # log of the mean probability, so loss and top-k stay meaningful
                    flipped = model(x.flip(-1)).float().cpu()
                    out = torch.logsumexp(torch.stack([out.log_softmax(1), flipped.log_softmax(1)]),
                                          0) - math.log(2)
            if keep_logits:
                kept.append(out)
            sums[0] += F.cross_entropy(out, y, reduction="sum").item()
            k = min(5, out.shape[1])
            sums[1] += (out.topk(k, 1).indices == y[:, None]).any(1).sum().item()
            conf += torch.bincount(y * n_cls + out.argmax(1), minlength=n_cls * n_cls).view(n_cls, n_cls)
    if reduce is not None:
        conf, sums = reduce(conf, sums)
    loss_sum, top5 = sums.tolist()
    n = max(len(data), 1)
    per_class = (conf.diag().float() / conf.sum(1).clamp(min=1)).tolist()
    result = {"top1": conf.diag().sum().item() / n, "top5": top5 / n, "loss": loss_sum / n,
              "per_class": dict(zip(data.classes, per_class)), "confusion": conf.tolist(),
              "samples": len(data)}
    if keep_logits:
        result["logits"] = torch.cat(kept) if kept else torch.zeros(0, n_cls)
    return result


@dataclass
class EvalInput:
    """A checkpoint's model and a dataset split prepared the way the checkpoint says."""

    model: ResNet
    info: dict[str, Any]
    data: ArrayDataset
    mean: list[float]
    std: list[float]
    image_size: int


def open_eval(checkpoint: str | Path, dataset: str = "fashion-mnist", split: str = "test",
              data_dir: str | None = None, limit: int = 0) -> EvalInput:
    """Load a checkpoint (a .safetensors file, a run folder, a registry tag or a foreign
    weights file: see weights.load_source) and the dataset split at the
    checkpoint's input size and channels, with the checkpoint's class order (only the
    checkpoint's classes where it was trained on a subset of the dataset's); `limit` keeps
    the first N samples. Raises UserError when the class counts differ."""
    if limit < 0:
        raise UserError(f"limit must be >= 0 (0: every sample), got {limit}")
    model, info = load_source(checkpoint)
    pre = info.get("preprocess", {})
    size = pre.get("image_size", 0)
    names = info.get("classes")
    ds = load_dataset(dataset, split, data_dir, size, model.cfg.in_chans,
                      resize=pre.get("resize", 0),
                      interpolation=pre.get("interpolation", "bilinear"))
    # a folder's classes take the checkpoint's names where there are as many; a model
    # trained on some of the dataset's classes is judged on those, in its order
    data = restrict_to_classes(materialize(ds, classes=names), names)
    if len(data.classes) != model.num_classes:
        raise UserError(f"dataset {dataset} has {len(data.classes)} classes, the checkpoint "
                        f"{model.num_classes}")
    if limit and limit < len(data):
        data = data.subset(torch.arange(limit))
    return EvalInput(model, info, data, pre["mean"], pre["std"], size)


def evaluate_checkpoint(checkpoint: str | Path, dataset: str = "fashion-mnist",
                        split: str = "test", data_dir: str | None = None,
                        tta_flip: bool = False, limit: int = 0, batch_size: int = 1024,
                        variants: Variants | None = None) -> dict[str, Any]:
    """The checkpoint's accuracy on a dataset split (see `evaluate`).

    With `variants` (a function of the model and input size returning other inference
    paths by name), the result is instead the accuracy guard: each path's top-1, its top-1
    agreement with the checkpoint's own fp32 model (fraction of images given the same
    class) and the max and mean absolute logit difference, under "results"."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    e = open_eval(checkpoint, dataset, split, data_dir, limit)
    if variants is None:
        return evaluate(e.model, e.data, e.mean, e.std, e.image_size, batch_size,
                        tta_flip=tta_flip)
    e.model.eval()
    size = e.image_size or e.data.shape[-1]  # the size the model sees
    paths = {"baseline_fp32_nchw": ("fp32", e.model), **variants(e.model, size)}
    logits = {k: evaluate(fn, e.data, e.mean, e.std, e.image_size, batch_size,
                          keep_logits=True)["logits"] for k, (_, fn) in paths.items()}
    ref, labels, n = logits["baseline_fp32_nchw"], e.data.labels, len(e.data)
    results = {}
    for k, out in logits.items():
        d = (out - ref).abs()
        results[k] = {"precision": paths[k][0],
                      "top1": (out.argmax(1) == labels).sum().item() / n,
                      "agreement_with_fp32": (out.argmax(1) == ref.argmax(1)).sum().item() / n,
                      "max_abs_diff": d.max().item(), "mean_abs_diff": d.mean().item()}
    c = e.model.cfg
    return {"checkpoint": str(checkpoint),
            "model": f"{c.block} blocks, depth {c.depth}, widths {list(c.widths)}",
            "dataset": dataset, "samples": n, "logit_scale": ref.abs().max().item(),
            "results": results}

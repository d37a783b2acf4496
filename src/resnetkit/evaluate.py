"""Evaluate a model, or a checkpoint, on a dataset: top-1, top-5, loss, per-class accuracy,
the confusion matrix; and the agreement of other inference paths with a checkpoint's own
fp32 model (the accuracy guard, `guard`: `resnetkit bench --check`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .data import ArrayDataset, StreamedFolder, match_classes, materialize
from .data.preprocess import load_split, preprocess
from .errors import UserError
from .model import ResNet
from .runtime import autocast
from .untrusted import shown
from .weights.sources import load_source

# all_sum: sums tensors over the processes of a distributed run (see train.distributed)
Reduce = Callable[..., list[torch.Tensor]]
# variants(model, image_size) -> {name: (precision, callable on a float batch)}
Variants = Callable[[ResNet, int], dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]]]


def check_outputs(out: torch.Tensor, source: Any, inputs: Callable[[int], str]) -> torch.Tensor:
    """`out` (logits or probabilities, one row per input) if every value is finite, else a
    UserError naming `source` and the first input, inputs(row), whose outputs are not: the
    one check behind predict, eval on every engine, bench --check and int8 calibration.
    Weights can be finite and still overflow (values near float32's limit), so the weights'
    own check at load time does not cover this."""
    bad = ~torch.isfinite(out.reshape(len(out), -1)).all(1) if out.dim() else \
        ~torch.isfinite(out.reshape(1))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise UserError(f"{shown(source)} produced NaN or infinite outputs on "
                        f"{shown(inputs(row))}; its weights are unusable")
    return out


def _shard(n: int, batch_size: int, shard: tuple[int, int]) -> list[torch.Tensor]:
    """The index batches of process `rank` of `world` (contiguous shares of the dataset)."""
    rank, world = shard
    share = torch.tensor_split(torch.arange(n), world)[rank]
    lo, hi = (int(share[0]), int(share[-1]) + 1) if len(share) else (0, 0)
    return [torch.arange(i, min(i + batch_size, hi)) for i in range(lo, hi, batch_size)]


TTA_MAX_SHIFT = 4  # pixels a test-time view may move (tta_shift)


def evaluate(model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
             data: ArrayDataset | StreamedFolder, mean, std, image_size: int = 0,
             batch_size: int = 1024, precision: str = "fp32", channels_last: bool = False,
             device: torch.device | str = "cpu", shard: tuple[int, int] = (0, 1),
             reduce: Reduce | None = None, tta_flip: bool = False, tta_shift: int = 0,
             keep_logits: bool = False, source: Any = None,
             where: str = "the dataset") -> dict[str, Any]:
    """Top-1, top-5, loss, per-class accuracy and the confusion matrix on a dataset.

    model: a module or any callable from a float batch to logits. Under DDP each process
    evaluates its `shard` (rank, world) and `reduce` sums the counts over processes. With
    `tta_flip`, the class probabilities of each image and its mirror image are averaged;
    with `tta_shift` N, also those of each view shifted by N pixels up, down, left and right
    (edges repeated), at half weight (airbench's test-time augmentation).
    keep_logits adds "logits" (N, classes) in fp32, in dataset order (one process only).
    source: the model's name (a file, a tag): its outputs are then checked (check_outputs),
    and NaN or infinite logits on any image are a UserError naming it ("image 3 of `where`").
    Raises UserError when the model's outputs are not one per class of `data`."""
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
                if tta_flip or tta_shift:  # log of the mean probability: loss, top-k meaningful
                    views = _tta_views(x, tta_flip, tta_shift, fmt)
                    logp = [_checked(model(v).float().cpu(), n_cls, source, f"{where}{how}",
                                     idx).log_softmax(1) + math.log(w) for v, w, how in views]
                    total = sum(w for _, w, _ in views)
                    out = torch.logsumexp(torch.stack(logp), 0) - math.log(total)
                else:
                    out = _checked(model(x).float().cpu(), n_cls, source, where, idx)
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


def _tta_views(x: torch.Tensor, flip: bool, shift: int,
               fmt: torch.memory_format) -> list[tuple[torch.Tensor, float, str]]:
    """(view, weight, how) of a batch for test-time augmentation: the batch and, with `flip`,
    its mirror image at weight 1; with `shift`, each of those moved by `shift` pixels in the
    four directions at weight 1/2, the edge pixels repeated into the gap."""
    base = [(x, "")] + ([(x.flip(-1), " (mirrored)")] if flip else [])
    views = [(v, 1.0, how) for v, how in base]
    if shift:
        h, w = x.shape[-2:]
        for v, how in base:
            padded = F.pad(v, (shift,) * 4, mode="replicate")
            for dy, dx in ((0, shift), (0, -shift), (shift, 0), (-shift, 0)):
                moved = padded[..., shift + dy:shift + dy + h, shift + dx:shift + dx + w]
                views.append((moved.contiguous(memory_format=fmt), 0.5, f"{how} (shifted)"))
    return views


def _checked(out: torch.Tensor, n_cls: int, source: Any, where: str,
             idx: torch.Tensor) -> torch.Tensor:
    if out.dim() != 2 or out.shape[1] != n_cls:
        raise UserError(f"{shown(source or 'the model')} gives outputs of shape "
                        f"{tuple(out.shape)}, not one score for each of the {n_cls} classes "
                        f"of {shown(where)}")
    if source is not None:
        check_outputs(out, source, lambda row: f"image {int(idx[row])} of {where}")
    return out


def eval_data(dataset: str, split: str, data_dir: str | None, preprocess: dict[str, Any],
              in_chans: int, classes: list[str] | None, num_classes: int | None = None,
              limit: int = 0) -> tuple[ArrayDataset, list[str]]:
    """(the dataset split read at the model's input size, channels and resize, labelled by
    the model's `classes` by name (data.match_classes), the dataset's classes left out
    because the model does not know them): what every engine is judged on. `limit` keeps
    the first N samples. Raises UserError for a dataset class the model does not know
    (unless the model knows a subset of the dataset's classes) or class counts that
    differ where there are no names to match."""
    if limit < 0:
        raise UserError(f"limit must be >= 0 (0: every sample), got {limit}")
    ds = load_split(dataset, split, data_dir, preprocess, in_chans)
    own = list(ds.classes)
    data = materialize(match_classes(ds, classes, num_classes, f"{dataset} ({split})"))
    left_out = [c for c in own if c not in data.classes]
    if limit and limit < len(data):
        data = data.subset(torch.arange(limit))
    return data, left_out


@dataclass
class EvalInput:
    """A checkpoint's model and a dataset split prepared the way the checkpoint says."""

    model: ResNet
    info: dict[str, Any]
    data: ArrayDataset
    mean: list[float]
    std: list[float]
    image_size: int
    left_out: list[str] = dataclasses.field(default_factory=list)  # classes the model lacks


def open_eval(checkpoint: str | Path, dataset: str = "fashion-mnist", split: str = "test",
              data_dir: str | None = None, limit: int = 0) -> EvalInput:
    """Load a checkpoint (a .safetensors file, a run folder, a registry tag or a foreign
    weights file: see weights.load_source) and the dataset split at the
    checkpoint's input size and channels, with the checkpoint's class order (only the
    checkpoint's classes where it was trained on a subset of the dataset's, matched by name:
    see eval_data); `limit` keeps the first N samples."""
    if limit < 0:
        raise UserError(f"limit must be >= 0 (0: every sample), got {limit}")
    model, info = load_source(checkpoint)
    pre = info.get("preprocess") or {}
    if "mean" not in pre:
        raise UserError(f"{shown(checkpoint)} has no preprocessing metadata (mean, std, input "
                        f"size); evaluate a checkpoint that resnetkit trained or converted")
    data, left_out = eval_data(dataset, split, data_dir, pre, model.cfg.in_chans,
                               info.get("classes"), model.num_classes, limit)
    return EvalInput(model, info, data, pre["mean"], pre["std"], pre.get("image_size", 0),
                     left_out)


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
        r = evaluate(e.model, e.data, e.mean, e.std, e.image_size, batch_size,
                     tta_flip=tta_flip, source=checkpoint, where=f"{dataset} {split}")
        return {**r, **left_out_note(e.left_out)}
    e.model.eval()
    size = e.image_size or e.data.shape[-1]  # the size the model sees
    paths = {"baseline_fp32_nchw": ("fp32", e.model), **variants(e.model, size)}
    return guard(checkpoint, e.model.cfg, dataset, split, e.data, paths,
                 {"mean": e.mean, "std": e.std, "image_size": e.image_size}, batch_size,
                 e.left_out)


def guard(checkpoint: Any, cfg: Any, dataset: str, split: str, data: ArrayDataset,
          paths: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]],
          pre: dict[str, Any], batch_size: int, left_out: list[str]) -> dict[str, Any]:
    """The accuracy guard: every path ({name: (precision, callable on a float batch)}, the
    first the reference, the checkpoint's own fp32 model) evaluated on `data` normalised by
    `pre` (mean, std, image_size): each path's top-1, its top-1 agreement with the
    reference (fraction of images given the same class) and the max and mean absolute
    logit difference, under "results"; the outputs of each checked (check_outputs)."""
    where = f"{dataset} {split}"
    logits = {k: evaluate(fn, data, pre["mean"], pre["std"], pre["image_size"], batch_size,
                          keep_logits=True, source=f"{checkpoint} ({k})",
                          where=where)["logits"] for k, (_, fn) in paths.items()}
    ref, labels, n = next(iter(logits.values())), data.labels, len(data)
    results = {}
    for k, out in logits.items():
        d = (out - ref).abs()
        results[k] = {"precision": paths[k][0],
                      "top1": (out.argmax(1) == labels).sum().item() / n,
                      "agreement_with_fp32": (out.argmax(1) == ref.argmax(1)).sum().item() / n,
                      "max_abs_diff": d.max().item(), "mean_abs_diff": d.mean().item()}
    return {"checkpoint": str(checkpoint),
            "model": f"{cfg.block} blocks, depth {cfg.depth}, widths {list(cfg.widths)}",
            "dataset": dataset, "samples": n, "logit_scale": ref.abs().max().item(),
            "results": results, **left_out_note(left_out)}


def left_out_note(left_out: list[str]) -> dict[str, list[str]]:
    """{"classes_left_out": [...]} where the dataset's samples of classes the model does not
    know were left out (a model trained on some of them), else {}."""
    return {"classes_left_out": list(left_out)} if left_out else {}

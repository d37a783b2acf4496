"""Calibration images for post-training int8: a dataset's training split read and
normalised the way the checkpoint says (data.preprocess), or tensors and loaders given in
Python; bounded and checked before any quantizer sees them. And the check that a model's
outputs on them are finite."""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch

from ..data import ArrayDataset, materialize, restrict_to_classes
from ..data.preprocess import complete, load_split, preprocess
from ..errors import UserError
from ..evaluate import check_outputs
from ..untrusted import shown

MIN_IMAGES = 2  # per-tensor activation ranges from a single image describe that image only
DEFAULT_IMAGES = 512
# the most images a dataset spec may ask for: ranges settle within a few hundred images, and
# 10,000 preprocessed 3x224x224 images already take 6 GB as float
MAX_IMAGES = 10_000
CALIBRATION_BATCH = 32
NO_CALIBRATION = ("int8 needs calibration images: in Python, calibration= a dataset spec such "
                  "as fashion-mnist:512, a tensor or a DataLoader; on the command line, "
                  "precision int8 needs --calibration DATASET[:N]")
_DIR_KINDS = ("idx", "cifar", "folder")  # specs whose first part after the kind is a folder


def parse_calibration(spec: str) -> tuple[str, int]:
    """"fashion-mnist" -> ("fashion-mnist", DEFAULT_IMAGES); "folder:DIR:300" -> ("folder:DIR",
    300): a trailing ":N" is the number of training images to calibrate on, a whole number
    from MIN_IMAGES to MAX_IMAGES (a split with fewer images gives all it has). The part
    after the last colon is a count unless it is the DIR of "idx:DIR", "cifar:DIR" or
    "folder:DIR" or holds a "/" (a path: "fashion-mnist:/data/fm"). Raises UserError for
    any other count ("abc", "2.5", "0", a number past MAX_IMAGES)."""
    name, sep, last = spec.rpartition(":")
    if not sep or name in _DIR_KINDS or "/" in last or "\\" in last:
        return spec, DEFAULT_IMAGES
    # at most 9 digits before int(): a count of thousands of digits is refused, not parsed
    if not (last.isascii() and last.isdigit() and len(last) <= 9
            and MIN_IMAGES <= int(last) <= MAX_IMAGES):
        got = last if len(last) <= 20 else last[:20] + "..."
        raise UserError(f"the calibration image count (after {shown(repr(name[:100]))}) must "
                        f"be a whole number from {MIN_IMAGES} to {MAX_IMAGES:,} (the most "
                        f"read from a dataset), got {shown(repr(got))}")
    return name, int(last)


def calibration_set(calibration: Any, in_chans: int, image_size: int = 0,
                    preprocess: dict[str, Any] | None = None, limit: int = 0,
                    data_dir: str | None = None, batch_size: int = CALIBRATION_BATCH,
                    classes: list[str] | None = None) -> list[torch.Tensor]:
    """Calibration batches (float NCHW, preprocessed) from any of:
    a dataset spec ("fashion-mnist", "folder:DIR", ...; a trailing ":N" takes N images) whose
    training split is read at the checkpoint's size and normalised with its `preprocess`
    (mean, std, image_size, resize, interpolation); a float tensor (N, C, H, W) already
    preprocessed; or an iterable of such tensors or of (tensor, label) pairs (a DataLoader).
    At most `limit` images are used (0: for a spec, DEFAULT_IMAGES; else all). classes: the
    checkpoint's class names; a dataset spec then gives images of those classes only, where
    the model was trained on a subset of the dataset's classes.

    Raises UserError for no data, fewer than MIN_IMAGES images, images that are not float
    (N, C, H, W) or hold NaN or infinite values, or whose channels or size differ from the
    model's: all checked before any quantizer sees them."""
    image_size = image_size or (preprocess or {}).get("image_size", 0)
    if calibration is None or (isinstance(calibration, str) and not calibration.strip()):
        raise UserError(NO_CALIBRATION)
    if isinstance(calibration, str):
        batches = _from_dataset(calibration, in_chans, image_size, preprocess, limit,
                                data_dir, batch_size, classes)
    else:
        batches = _from_tensors(calibration, limit, batch_size)
    n = sum(len(b) for b in batches)
    if n == 0:
        raise UserError("the calibration set is empty: int8 needs real images to measure "
                        "the activation ranges")
    if n < MIN_IMAGES:
        raise UserError(f"the calibration set holds {n} image; int8 needs at least "
                        f"{MIN_IMAGES} (a few hundred measure the activation ranges well)")
    shape = tuple(batches[0].shape[1:])
    seen = 0
    for b in batches:
        if b.dim() != 4 or tuple(b.shape[1:]) != shape:
            raise UserError(f"calibration images must all be C x H x W of one size; got "
                            f"{tuple(b.shape[1:])} after {shape}")
        finite = torch.isfinite(b.reshape(len(b), -1)).all(1)
        if not bool(finite.all()):
            raise UserError(f"calibration image {seen + int((~finite).nonzero()[0, 0])} holds "
                            f"NaN or infinite values; int8 needs real, preprocessed images")
        seen += len(b)
    want = f"{in_chans}x{image_size}x{image_size}" if image_size else f"{in_chans} channels"
    if shape[0] != in_chans or (image_size and shape[1:] != (image_size, image_size)):
        raise UserError(f"calibration images are {'x'.join(map(str, shape))}, the model "
                        f"takes {want}")
    return batches


def _from_tensors(data: Any, limit: int, batch_size: int) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        data = [data] if data.dim() != 3 else [data[None]]
    out, n = [], 0
    try:
        items: Iterable = iter(data)
    except TypeError:
        raise UserError(f"calibration must be a dataset name, a tensor or an iterable of "
                        f"batches, not {type(data).__name__}") from None
    for item in items:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise UserError("calibration batches must be float tensors (N, C, H, W), "
                            "preprocessed as the model expects")
        if x.dim() not in (3, 4):
            raise UserError(f"calibration batches must be float tensors (N, C, H, W), got "
                            f"one of shape {tuple(x.shape)}")
        x = x[None] if x.dim() == 3 else x
        if limit:
            x = x[:limit - n]
        if len(x):
            out += list(x.float().split(batch_size))
            n += len(x)
        if limit and n >= limit:
            break
    return out


def _from_dataset(spec: str, in_chans: int, image_size: int, pre: dict[str, Any] | None,
                  limit: int, data_dir: str | None, batch_size: int,
                  classes: list[str] | None = None) -> list[torch.Tensor]:
    name, count = parse_calibration(spec)
    if limit > MAX_IMAGES:
        raise UserError(f"at most {MAX_IMAGES:,} calibration images can be read from a "
                        f"dataset, not {limit:,}")
    count = limit or count
    if pre is None:
        raise UserError("a calibration dataset needs the model's preprocessing (mean, std, "
                        "input size): quantize a trained checkpoint, or pass preprocessed "
                        "tensors")
    size = pre.get("image_size", image_size) or image_size
    ds = load_split(name, "train", data_dir, complete({**pre, "image_size": size}, in_chans),
                    in_chans)
    # a model of some of the dataset's classes calibrates on those (labels by name, before
    # anything of a folder is decoded); then a fixed random draw over the whole split: the
    # first N images of a folder would be the first classes only
    ds = restrict_to_classes(ds, classes)
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:count]
    if isinstance(ds, ArrayDataset):
        ds = ds.subset(keep.sort().values)
    else:
        picked = copy.copy(ds)
        picked.samples = [ds.samples[i] for i in keep.sort().values.tolist()]
        ds = materialize(picked)
    chans = ds.images.shape[1] if len(ds) else in_chans
    if chans != in_chans:
        raise UserError(f"{name} has {chans}-channel images, the model takes {in_chans}")
    return [preprocess(ds.images[i:i + batch_size], pre["mean"], pre["std"], size)
            for i in range(0, len(ds), batch_size)]


def check_calibration_outputs(run: Any, batches: list[torch.Tensor], source: Any = "the model",
                              fallback: Any = None) -> None:
    """Run `run` on every calibration batch and check its outputs (evaluate.check_outputs):
    a model whose weights overflow is one UserError naming `source`, not a quantizer's
    traceback. fallback: the float model, run on a batch where `run` (a graph with
    observers) fails, so that such a failure is reported as the model's outputs when they
    are not finite (and raised as it is when they are)."""
    seen = 0
    with torch.no_grad():
        for x in batches:
            try:
                out = run(x)
            except RuntimeError:
                if fallback is None:
                    raise
                check_outputs(fallback(x), source, lambda row: f"calibration image {seen + row}")
                raise
            check_outputs(out, source, lambda row: f"calibration image {seen + row}")
            seen += len(x)

"""The one way images become a model's input: a checkpoint's "preprocess" entry (mean, std,
image_size, resize, interpolation, in_chans) applied to image files, to a dataset split, or
to uint8 batches already at the model's size. predict, eval, int8 calibration and the
server's workers all read their images through here, so that each sees the same pixels."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from . import transforms as T
from .lookup import load_dataset
from .readers import ArrayDataset, ImageFolder, load_image

# what a "preprocess" entry without these keys means (torchvision's eval transform)
DEFAULTS = {"resize": 0, "interpolation": "bilinear"}


def complete(pre: dict[str, Any], in_chans: int | None = None) -> dict[str, Any]:
    """`pre` with every key present: resize (0: none) and interpolation defaulted, in_chans
    from `in_chans` or the number of means. Entries read from files come complete already
    (weights.checkpoint.check_preprocess); this is for those passed in from Python."""
    chans = pre.get("in_chans") or in_chans or len(pre["mean"])
    return {**DEFAULTS, **pre, "in_chans": chans}


def preprocess(images: torch.Tensor, mean, std, image_size: int = 0) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> the normalised float batch at the eval size (resized and
    centre-cropped where they are not image_size x image_size already)."""
    x = images.float() / 255
    if image_size and x.shape[-1] != image_size:
        x = T.resize_center_crop(x, image_size)
    return T.normalize(x, mean, std)


def model_input(images: torch.Tensor, pre: dict[str, Any]) -> torch.Tensor:
    """uint8 images at the model's size -> its normalised float input, by `pre`."""
    return preprocess(images, pre["mean"], pre["std"])


def load_images(files: Sequence[str | Path], pre: dict[str, Any]) -> torch.Tensor:
    """Image files as one uint8 batch (N, C, size, size), each resized, centre-cropped and
    converted to the model's channels as `pre` says (see readers.load_image: the same steps
    as the server's decoder). Raises UserError naming a file that is not a regular file or
    cannot be decoded."""
    pre = complete(pre)
    return torch.stack([load_image(f, pre["image_size"], pre["in_chans"], pre["resize"],
                                   pre["interpolation"]) for f in files])


def load_split(name: str, split: str, data_dir: str | None, pre: dict[str, Any],
               in_chans: int) -> ArrayDataset | ImageFolder:
    """A dataset split (data.load_dataset) read at the model's input size, channels, resize
    and interpolation: what eval and int8 calibration judge and calibrate on."""
    pre = complete(pre, in_chans)
    return load_dataset(name, split, data_dir, pre.get("image_size", 0), in_chans,
                        resize=pre["resize"], interpolation=pre["interpolation"])

"""Conv arithmetic along a network's main path, the one input-size rule derived from it, and
the check of a batch against a model's input.

Every place that needs to know whether an input is large enough (the model's forward, the
analysis verbs, the trainer, bench, export) calls `check_input_size`, so the rule and its
wording exist once."""
from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

# The largest input side any verb accepts (images, --image-size, a file's metadata): 32x
# ImageNet's 224 is far beyond any real use, while the activations of a larger one outgrow
# any machine's memory.
MAX_IMAGE_SIZE = 8192


def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    """A conv or pool argument (kernel_size, stride, padding, dilation) as (height, width)."""
    return (v, v) if isinstance(v, int) else tuple(v)


def out_size(size: int, m: nn.Module, axis: int = 0) -> int:
    """Output size along one spatial axis of a conv or pool layer:
    floor((size + 2p - d(k-1) - 1) / s) + 1 (ceil instead of floor for ceil_mode pools)."""
    pick = lambda v: v[axis] if isinstance(v, tuple) else v  # noqa: E731
    k, s, p = pick(m.kernel_size), pick(m.stride), pick(m.padding)
    d = pick(getattr(m, "dilation", 1))
    num = size + 2 * p - d * (k - 1) - 1
    if getattr(m, "ceil_mode", False):
        return -(-num // s) + 1
    return num // s + 1


def main_path(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of the convs and pools on a ResNet's main path, in forward order."""
    stem = [(n, m) for n, m in model.named_modules() if n.split(".")[0] == "conv1"
            and isinstance(m, nn.Conv2d)]
    pool = [("maxpool", model.maxpool)] if isinstance(model.maxpool, nn.MaxPool2d) else []
    body = [(f"{stage}.{i}.{n}", m) for stage in model.stage_names
            for i, b in enumerate(getattr(model, stage))
            for n, m in b.named_children() if n.startswith("conv")]
    return stem + pool + body


def receptive_fields(model: nn.Module) -> list[tuple[str, int, int]]:
    """(layer, receptive field, effective stride) after each layer of the main path: the
    theoretical receptive field along the path that grows it most (the convs of every block,
    not its shortcut), by the recursion of Araujo et al. (Distill, 2019):
    r_out = r_in + (k - 1) * d * j_in and j_out = j_in * s, from r = j = 1 at the input.
    It does not depend on the input size (it may exceed it)."""
    pick = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731
    r, j, out = 1, 1, []
    for name, m in main_path(model):
        k, s, d = pick(m.kernel_size), pick(m.stride), pick(getattr(m, "dilation", 1))
        r, j = r + (k - 1) * d * j, j * s
        out.append((name, r, j))
    return out


def size_walk(model: nn.Module, size: int) -> list[tuple[str, int, int]]:
    """(layer, size in, size out) along the main path for an input side of `size`; stops at
    the first layer whose output would be empty."""
    walk = []
    for name, m in main_path(model):
        walk.append((name, size, out_size(size, m)))
        size = walk[-1][2]
        if size < 1:
            break
    return walk


def min_input_size(model: nn.Module) -> int:
    """The smallest input side for which no layer's output is empty."""
    size = 1
    while size_walk(model, size)[-1][2] < 1:
        size += 1
    return size


def check_input_size(model: nn.Module, height: int, width: int | None = None) -> None:
    """Raise a UserError naming the first layer whose output would be empty at this input
    size, and the smallest size that works."""
    width = height if width is None else width
    if max(height, width) > MAX_IMAGE_SIZE:
        raise UserError(f"input {height}x{width} is too large: at most {MAX_IMAGE_SIZE}x"
                        f"{MAX_IMAGE_SIZE}")
    for side in (height, width):
        walk = size_walk(model, side)
        if walk[-1][2] < 1:
            name, s_in, _ = walk[-1]
            low = min_input_size(model)
            raise UserError(f"input {height}x{width} is too small: {name} would output an "
                            f"empty map (layer {name} gets {s_in}x{s_in} and would output 0x0); "
                            f"use an input of at least {low}x{low}")


def check_input(model: nn.Module, x: torch.Tensor) -> None:
    """Raise a UserError unless x is a 4-D batch with the model's input channels and a size
    large enough for every layer (model: a ResNet, with cfg and min_input_size)."""
    if x.dim() != 4:
        raise UserError(f"expected a 4-D batch (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != model.cfg.in_chans:
        raise UserError(f"expected {model.cfg.in_chans} input channels, got {x.shape[1]} "
                        f"(shape {tuple(x.shape)}); build the model with "
                        f"in_chans={x.shape[1]} or convert the images")
    if min(x.shape[2], x.shape[3]) < model.min_input_size or max(x.shape[2:]) > MAX_IMAGE_SIZE:
        check_input_size(model, x.shape[2], x.shape[3])

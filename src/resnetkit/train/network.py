"""The network a run trains: built for its data and checked before and after, started from
initial weights with frozen parts (fine-tuning), placed on its device and, under torchrun,
wrapped for DDP."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..data.preprocess import preprocess
from ..errors import UserError
from ..geometry import check_input_size, size_walk
from ..runtime import check_memory
from ..zoo import create_model, get_config
from . import distributed as D
from .config import TrainConfig
from .feed import Feed
from .finetune import freeze, freeze_batchnorm, start_from


def _warn_if_collapsed(model, name: str, image_size: int) -> None:
    """Warn when the feature maps shrink to 1x1 before the last stage: those layers then see
    no spatial context (a ResNet-50 at 16x16 is 1x1 from its third stage on)."""
    walk = size_walk(model, image_size)
    first = next((n for n, _, out in walk if out == 1), None)
    last_stage = model.stage_names[-1]
    if first is not None and not first.startswith(last_stage):
        warnings.warn(f"at image_size {image_size}, {name}'s feature maps are 1x1 from {first} "
                      f"on; use a larger --image_size or a network for small images "
                      f"(resnet20...)", stacklevel=4)  # the caller of Trainer(...)


def build_model(cfg: TrainConfig, feed: Feed, load_init: bool) -> nn.Module:
    """cfg.model for the data's channels and classes: its memory checked before it is built
    and the image size after, with its fine-tuning start: initial weights (cfg.init, unless
    `load_init` is False: a resumed run has its own), whose normalisation `feed` takes when it
    fits the data, frozen BatchNorm and frozen parts. Raises UserError for a network that
    cannot train on this data or this machine."""
    shape = {**cfg.model_overrides, "in_chans": feed.train.shape[0],
             "num_classes": len(feed.train.classes)}
    check_memory(get_config(cfg.model, **shape), feed.image_size, cfg.batch_size,
                 training=True, what=f"training {cfg.model}")
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    model = create_model(cfg.model, **shape)
    check_input_size(model, feed.image_size)
    _warn_if_collapsed(model, cfg.model, feed.image_size)
    if cfg.whiten_stem:
        whiten_stem(model, feed)
    if cfg.init and load_init:
        pre = start_from(model, cfg.init, list(feed.train.classes)).get("preprocess", {})
        if len(pre.get("mean", ())) == len(feed.mean):  # the weights' own normalisation
            feed.mean, feed.std = tuple(pre["mean"]), tuple(pre["std"])
    if cfg.bn_scale_fixed:  # airbench's BN: the scales keep their start, the shifts learn
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.weight is not None:
                m.weight.requires_grad_(False)
    if cfg.freeze_bn:
        freeze_batchnorm(model)
    if cfg.freeze:
        freeze(model, cfg.freeze)
    return model


# the whitening's statistics: patches of at most this many training images (the first ones,
# so a resumed run or another rank computes the same filters), at most WHITEN_PATCHES patches
WHITEN_IMAGES = 5_000
WHITEN_PATCHES = 4_000_000
WHITEN_EPS = 5e-4  # added to each eigenvalue (airbench's value, for inputs of unit variance)


def whiten_stem(model: nn.Module, feed: Feed) -> int:
    """airbench's first layer: the network's first conv becomes a whitening of the training
    images' patches, and stays fixed. Its filters are the leading eigenvectors v_i of the
    covariance of the (normalised) k x k patches, each scaled by 1/sqrt(lambda_i + eps), and
    their negatives, so that the ReLU after it passes both signs: each of the first n output
    channels then has unit variance over the data and no two are correlated. n = min(out / 2,
    in x k x k); channels beyond 2n keep their random start. Returns n. Raises UserError for
    a dataset not held in memory or a first conv that is grouped or dilated."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise UserError("whiten_stem needs a first conv without groups or dilation")
    images = getattr(feed.train, "images", None)
    if images is None:
        raise UserError("whiten_stem needs a dataset held in memory (fashion-mnist, idx:, "
                        "cifar:), not image files read while training")
    k = conv.kernel_size
    d = conv.in_channels * k[0] * k[1]
    per_image = max(1, (feed.image_size - k[0] + 1) * (feed.image_size - k[1] + 1))
    count = min(len(images), WHITEN_IMAGES, max(1, WHITEN_PATCHES // per_image))
    total = torch.zeros(d, dtype=torch.float64)
    outer = torch.zeros(d, d, dtype=torch.float64)
    n_patches = 0
    for start in range(0, count, 256):
        x = preprocess(images[start:min(start + 256, count)], feed.mean, feed.std,
                       feed.image_size)
        p = F.unfold(x, k).transpose(1, 2).reshape(-1, d).double()  # one patch a row
        total += p.sum(0)
        outer += p.T @ p
        n_patches += len(p)
    mean = total / n_patches
    cov = outer / n_patches - torch.outer(mean, mean)
    eigval, eigvec = torch.linalg.eigh(cov)  # ascending
    n = min(conv.out_channels // 2, d)
    eigval, eigvec = eigval[-n:].flip(0).clamp(min=0), eigvec[:, -n:].flip(1)  # the n largest
    lead = eigvec.T / torch.sqrt(eigval + WHITEN_EPS)[:, None]
    filters = torch.cat([lead, -lead]).reshape(2 * n, conv.in_channels, *k)
    with torch.no_grad():
        conv.weight[:2 * n] = filters.to(conv.weight.dtype)
        if conv.bias is not None:
            conv.bias.zero_()
    for p in conv.parameters():
        p.requires_grad_(False)
    return n


def place(model: nn.Module, sync_bn: bool, info: D.DistInfo, device: torch.device,
          dtype: torch.dtype, fmt: torch.memory_format) -> tuple[nn.Module, nn.Module]:
    """(the model on its device, dtype and memory format, what the training forward calls):
    the same module on one process; under torchrun its DDP wrapper, with SyncBatchNorm when
    `sync_bn` (then DDP need not broadcast the BN buffers)."""
    if sync_bn and info.active:
        model = D.convert_sync_batchnorm(model, device)
    model = model.to(device, dtype, memory_format=fmt)
    if not info.active:
        return model, model
    from torch.nn.parallel import DistributedDataParallel
    return model, DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=not sync_bn)

"""The network a run trains: built for its data and checked before and after, started from
initial weights with frozen parts (fine-tuning), placed on its device and, under torchrun,
wrapped for DDP."""
from __future__ import annotations

import warnings

import torch
from torch import nn

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
    if cfg.init and load_init:
        pre = start_from(model, cfg.init, list(feed.train.classes)).get("preprocess", {})
        if len(pre.get("mean", ())) == len(feed.mean):  # the weights' own normalisation
            feed.mean, feed.std = tuple(pre["mean"]), tuple(pre["std"])
    if cfg.freeze_bn:
        freeze_batchnorm(model)
    if cfg.freeze:
        freeze(model, cfg.freeze)
    return model


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

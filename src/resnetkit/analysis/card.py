"""A model card: the facts a page shows beside a served model (its preset, depth accounting,
parameters, MACs and the architecture diagram), all derived from the config."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..config import ResNetConfig
from ..model import ResNet
from ..zoo import PRESETS
from .describe import describe
from .diagram import layout, to_svg
from .summary import summary


def preset_of(cfg: ResNetConfig) -> str | None:
    """The preset whose architecture `cfg` is, up to the classifier size and input channels
    (what fine-tuning changes); None for a custom network."""
    for name, p in PRESETS.items():
        if dataclasses.replace(p, num_classes=cfg.num_classes, in_chans=cfg.in_chans) == cfg:
            return name
    return None


def model_card(cfg: ResNetConfig, image_size: int) -> dict[str, Any]:
    """{"preset", "block", "layers", "image_size", "in_chans", "num_classes", "depth" (the
    describe walk-through's accounting), "params", "macs", "diagram_svg"} for `cfg` at
    `image_size`. Built on the meta device: no weights, no memory, no math."""
    with torch.device("meta"):
        model = ResNet(cfg)
    walk = describe(model, image_size)
    totals = summary(model, image_size, depth=1, memory=False)["totals"]
    return {"preset": preset_of(cfg), "block": cfg.block, "layers": list(cfg.layers),
            "image_size": image_size, "in_chans": cfg.in_chans, "num_classes": cfg.num_classes,
            "depth": walk["depth"], "params": totals["params"], "macs": totals["macs"],
            "diagram_svg": to_svg(layout(walk))}

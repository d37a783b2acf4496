"""Fine-tuning: start from weights (a registry tag, a foreign file or a run), freeze parts
of the network, freeze BatchNorm, and train the new head faster than the backbone."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..model import ResNet
from ..weights.sources import load_into, read_source

# What --freeze names: the stem (conv1 and bn1, or the deep stem), each stage, or everything
# but the classifier.
PARTS = ("stem", "layer1", "layer2", "layer3", "layer4", "backbone")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (torchvision's detection
    backbones use it): y = (x - mean) / sqrt(var + eps) * weight + bias, nothing learned and
    nothing updated in training. Its state_dict keys are BatchNorm2d's, num_batches_tracked
    included, so checkpoints load either way."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, getattr(bn, name).detach().clone())
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())
        self.eps = bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm2d inside `module` with a FrozenBatchNorm2d; returns how many."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child))
            n += 1
        else:
            n += freeze_batchnorm(child)
    return n


def _modules(model: ResNet, part: str) -> list[nn.Module]:
    if part == "stem":
        return [model.conv1, model.bn1]
    if part == "backbone":
        return [m for n, m in model.named_children() if n != "fc"]
    return [getattr(model, part)]


def freeze(model: ResNet, parts: list[str]) -> int:
    """Stop gradients to the named parts (see PARTS); returns the number of frozen
    parameters. Their BatchNorm layers keep running in train mode unless frozen too."""
    bad = [p for p in parts if p not in PARTS or (p.startswith("layer") and not hasattr(model, p))]
    if bad:
        raise UserError(f"cannot freeze {', '.join(bad)}: choose from {', '.join(PARTS)}")
    n = 0
    for part in parts:
        for m in _modules(model, part):
            for p in m.parameters():
                n += p.numel() if p.requires_grad else 0
                p.requires_grad_(False)
    return n


def start_from(model: ResNet, source: str) -> dict[str, Any]:
    """Load `source` (registry tag, weights file, resnetkit checkpoint or run folder) into
    the model; a head of another size starts fresh. Returns the source's metadata (its
    "preprocess" when it has one)."""
    state, kind, info, _ = read_source(source)
    load_into(model, state, source, kind)
    return info

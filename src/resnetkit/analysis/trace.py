"""One forward pass with hooks: what every layer receives, produces and costs.

Cost conventions (those of torchvision's published GFLOPS, which count multiply-adds):
- conv MACs = output elements x (in_channels / groups) x kernel_h x kernel_w; fc MACs =
  in_features x out_features per sample; no bias terms. This is torchvision's "GFLOPS".
- the other ops are counted in elements: BN (output elements), ReLU (elements, every call of
  a shared module), max-pool and average-pool (input elements), residual adds (output
  elements of each block), fc bias (outputs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..blocks import ResidualBlock
from ..layers import AvgPoolSame, FrozenBatchNorm2d, GlobalPool, ZeroPadShortcut
from ..geometry import check_input_size, out_size
from ..model import ResNet

KINDS = ("conv", "fc", "bn", "relu", "maxpool", "avgpool", "add", "fc_bias")


@dataclass
class LayerRecord:
    """One call of one layer during the traced forward pass."""

    name: str
    type: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: int
    macs: int = 0
    kind: str = ""          # one of KINDS, or "" for layers that cost nothing (identity...)
    elements: int = 0       # elements counted for the non-MAC kinds
    formula_hw: tuple[int, int] | None = None   # output H, W by the conv/pool formula
    module: nn.Module | None = field(default=None, repr=False)


def _cost(name: str, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> LayerRecord:
    rec = LayerRecord(name, type(m).__name__, tuple(x.shape), tuple(y.shape),
                      sum(p.numel() for p in m.parameters(recurse=False)), module=m)
    if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0] * m.kernel_size[1]
        rec.kind, rec.macs = "conv", y.numel() * (m.in_channels // m.groups) * k
    elif isinstance(m, nn.Linear):
        rec.kind, rec.macs = "fc", y.numel() * m.in_features
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d)):
        rec.kind, rec.elements = "bn", y.numel()
    elif isinstance(m, nn.ReLU):
        rec.kind, rec.elements = "relu", y.numel()
    elif isinstance(m, nn.MaxPool2d):
        rec.kind, rec.elements = "maxpool", x.numel()
    elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, AvgPoolSame, GlobalPool)):
        rec.kind, rec.elements = "avgpool", x.numel()
    if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        rec.formula_hw = (out_size(x.shape[2], m, 0), out_size(x.shape[3], m, 1))
    return rec


def trace(model: nn.Module, image_size: tuple[int, int], batch: int = 1,
          in_chans: int | None = None) -> list[LayerRecord]:
    """Run one forward pass and record every layer call in execution order.

    The pass runs wherever the model's parameters live; a model built on the meta device
    gives every shape and count without any arithmetic (see `build_model`).
    """
    if isinstance(model, ResNet):
        check_input_size(model, *image_size)
        in_chans = model.cfg.in_chans
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    records: list[LayerRecord] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, ResidualBlock):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, n=name: records.append(LayerRecord(
                    f"{n}.add", "ResidualAdd", tuple(out.shape), tuple(out.shape), 0,
                    kind="add", elements=out.numel(), module=mod))))
        elif not list(m.children()) or isinstance(m, ZeroPadShortcut):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, n=name: records.append(_cost(n, mod, inp[0], out))))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(batch, in_chans or 3, *image_size, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    fc = next((r for r in records if r.kind == "fc" and r.module.bias is not None), None)
    if fc is not None:
        records.append(LayerRecord(f"{fc.name}.bias", "Bias", fc.out_shape, fc.out_shape, 0,
                                   kind="fc_bias", elements=fc.out_shape[-1] * batch))
    return records


def build_model(name_or_model, meta: bool = True, **overrides) -> nn.Module:
    """A preset (or config) built on the meta device (shapes and counts, no memory, no
    math), or for real with meta=False; a module is returned as it is."""
    from ..zoo import create_model
    if isinstance(name_or_model, nn.Module):
        return name_or_model
    with torch.device("meta" if meta else "cpu"):
        return create_model(name_or_model, **overrides)


def totals(records: list[LayerRecord]) -> dict[str, int]:
    """MACs (conv, fc) and element counts (everything else) per kind."""
    out = {k: 0 for k in KINDS}
    for r in records:
        if r.kind:
            out[r.kind] += r.macs if r.kind in ("conv", "fc") else r.elements
    return out

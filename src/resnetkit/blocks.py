"""Residual blocks and shortcuts. Attribute names follow torchvision so checkpoints load."""
from __future__ import annotations

import torch
from torch import nn

from . import fused
from .config import ResNetConfig
from .layers import AvgPoolSame, DropPath, SqueezeExcite, ZeroPadShortcut, conv1x1, conv3x3, \
    make_norm


class Projection(nn.Sequential):
    """A projection shortcut (options B and C): [avg-pool,] 1x1 conv[, BN]."""

    @torch.jit.unused
    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same, its BN by the fused kernels (fused.py) where they take it."""
        *first, last = self
        for layer in first:
            x = layer(x)
        return fused.norm_act(last, x, relu=False) if isinstance(last, nn.BatchNorm2d) \
            else last(x)


def make_shortcut(cfg: ResNetConfig, in_chs: int, out_chs: int, stride: int,
                  dilation: int = 1) -> nn.Module | None:
    """The shortcut of one block for the config's option (A, B or C) and avg_down; None for
    a plain network (shortcut "none"). In a dilated stage (stride turned into dilation) the
    avg-down pool keeps its 2x2 window at stride 1, "same"-padded, as timm's does."""
    if cfg.shortcut == "none":
        return None
    changes = stride != 1 or in_chs != out_chs
    if cfg.shortcut == "A" or (cfg.shortcut == "B" and not changes):
        return ZeroPadShortcut(in_chs, out_chs, stride) if changes else nn.Identity()
    if cfg.avg_down:
        pool = (nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                if stride > 1 else AvgPoolSame() if dilation > 1 and changes else nn.Identity())
        layers = [pool, conv1x1(in_chs, out_chs)]
    else:
        layers = [conv1x1(in_chs, out_chs, stride)]
    # Pre-activation blocks feed the projection an already normalised input.
    return Projection(*layers) if cfg.preact else \
        Projection(*layers, make_norm(cfg.norm_layer, out_chs))


class ResidualBlock(nn.Module):
    """What every residual block has besides its convs: the shortcut (downsample; None in a
    plain network, as torchvision's None where it has no projection), SE, drop path. Blocks
    take (cfg, in_chs, planes, stride, dilation of later convs, of the first, drop path)."""

    preact = False

    def _finish(self, cfg: ResNetConfig, in_chs: int, out_chs: int, stride: int,
                dilation: int, drop_path: float) -> None:
        # one activation module per call site (timm's act1..act3): quantizers and graph
        # rewrites that annotate modules need each use to be its own node
        for i in range(1, (3 if hasattr(self, "conv3") else 2) + 1):
            setattr(self, f"act{i}", nn.ReLU(inplace=True))
        self.se = SqueezeExcite(out_chs, cfg.se_ratio, cfg.se_divisor) if cfg.se_ratio \
            else nn.Identity()
        self.downsample = make_shortcut(cfg, in_chs, out_chs, stride, dilation)
        # a pre-activation block projects its normalised input; other shortcuts take x as is
        self.projects = isinstance(self.downsample, Projection)
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()

    def _shortcut(self, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        return self.downsample(pre if self.projects else x)

    def _add(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """F(x) + shortcut(x), or F(x) alone in a plain network."""
        if self.downsample is None:
            return out
        return self.drop_path(out) + self.downsample(x)

    @torch.jit.unused
    def fusable(self) -> bool:
        """Whether this block runs BN + sum + ReLU fused now (fused.py): inside
        fused_norm_act, a post-activation block without SE or drop path."""
        return fused.active() and not self.preact and isinstance(self.se, nn.Identity) and \
            isinstance(self.drop_path, nn.Identity)

    @torch.jit.unused
    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The block's forward with each BN, the residual sum and the ReLUs by the fused
        kernels (each falls back to the modules' ops where they do not take its input)."""
        last = 3 if hasattr(self, "conv3") else 2
        out = x
        for i in range(1, last):
            out = fused.norm_act(getattr(self, f"bn{i}"), getattr(self, f"conv{i}")(out))
        out = getattr(self, f"conv{last}")(out)
        if self.downsample is None:
            res = None
        elif isinstance(self.downsample, Projection):
            res = self.downsample.forward_fused(x)
        else:
            res = self.downsample(x)
        return fused.norm_act(getattr(self, f"bn{last}"), out, res)

    def residual_end(self) -> nn.Module:
        """What zero-init zeroes: the last BN (post-activation) or conv (pre-activation)."""
        last = 3 if hasattr(self, "conv3") else 2
        return getattr(self, f"conv{last}" if self.preact else f"bn{last}")


class BasicBlock(ResidualBlock):
    """Two 3x3 convs, post-activation (v1): conv-BN-ReLU-conv-BN, add, ReLU."""

    def __init__(self, cfg: ResNetConfig, in_chs: int, planes: int, stride: int,
                 dilation: int = 1, first_dilation: int = 1, drop_path: float = 0.0):
        super().__init__()
        out_chs = planes * cfg.block_expansion
        # Registered in torchvision's order (conv before its BN) so state_dicts list alike;
        # in a pre-activation block bn_i normalises conv_i's input instead of its output.
        self.conv1 = conv3x3(in_chs, planes, stride, dilation=first_dilation)
        self.bn1 = make_norm(cfg.norm_layer, in_chs if self.preact else planes)
        self.conv2 = conv3x3(planes, out_chs, dilation=dilation)
        self.bn2 = make_norm(cfg.norm_layer, planes if self.preact else out_chs)
        self._finish(cfg, in_chs, out_chs, stride, dilation, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # (TorchScript compiles no further than this)
            if self.fusable():
                return self.forward_fused(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.act2(self._add(out, x))


class PreActBasicBlock(BasicBlock):
    """Two 3x3 convs, pre-activation (v2, He et al. 2016): BN-ReLU-conv-BN-ReLU-conv, add."""

    preact = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        return self.drop_path(self.se(out)) + self._shortcut(x, pre)


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand, post-activation. The stage stride
    sits on the 3x3 (v1.5) or on the first 1x1 (v1, cfg.stride_in_1x1)."""

    def __init__(self, cfg: ResNetConfig, in_chs: int, planes: int, stride: int,
                 dilation: int = 1, first_dilation: int = 1, drop_path: float = 0.0):
        super().__init__()
        width = cfg.bottleneck_width(planes)
        out_chs = planes * cfg.block_expansion
        s1, s3 = (stride, 1) if cfg.stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(in_chs, width, s1)
        self.bn1 = make_norm(cfg.norm_layer, in_chs if self.preact else width)
        # its one 3x3 keeps the previous dilation in a dilated stage's first block (torchvision)
        self.conv2 = conv3x3(width, width, s3, cfg.groups, first_dilation)
        self.bn2 = make_norm(cfg.norm_layer, width)
        self.conv3 = conv1x1(width, out_chs)
        self.bn3 = make_norm(cfg.norm_layer, width if self.preact else out_chs)
        self._finish(cfg, in_chs, out_chs, stride, dilation, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # (TorchScript compiles no further than this)
            if self.fusable():
                return self.forward_fused(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.act3(self._add(out, x))


class PreActBottleneck(Bottleneck):
    """The bottleneck in pre-activation form (v2): each conv sees BN-ReLU of its input."""

    preact = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))
        out = self.conv3(self.act3(self.bn3(out)))
        return self.drop_path(self.se(out)) + self._shortcut(x, pre)


BLOCK_TYPES = {"basic": BasicBlock, "bottleneck": Bottleneck,
               "preact_basic": PreActBasicBlock, "preact_bottleneck": PreActBottleneck}

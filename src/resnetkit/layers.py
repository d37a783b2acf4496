"""The layers residual blocks are made of, besides torch's own: convs with the paper's
padding, the zero-padding shortcut, stochastic depth, squeeze-and-excitation, the normalisation
choices, the "same"-padded average pool of timm's dilated avg-down shortcut, and the global
pool of the head, and activation checkpointing of a stage. Every forward here is scriptable
and traceable."""
from __future__ import annotations

import contextlib
from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fused
from .config import GN_GROUPS


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, groups=groups,
                     bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


def make_divisible(v: float, divisor: int = 8) -> int:
    """v rounded half up to a multiple of divisor, at least divisor: timm's SE width rule
    (make_divisible with round_limit 0). With divisor 1 it is round-half-up of v."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (torchvision's detection
    backbones use it): y = (x - mean) / sqrt(var + eps) * weight + bias, nothing learned and
    nothing updated in training. Its state_dict keys are BatchNorm2d's, num_batches_tracked
    included, so BatchNorm checkpoints load strictly; torchvision's, which lack that key, load
    too."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "FrozenBatchNorm2d":
        frozen = cls(bn.num_features, bn.eps).to(bn.running_mean.device)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                getattr(frozen, name).copy_(getattr(bn, name))
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, chs: int) -> nn.Module:
    """The normalisation layer a config's norm_layer names, for chs channels."""
    if kind == "frozen_batchnorm":
        return FrozenBatchNorm2d(chs)
    if kind == "groupnorm":
        return nn.GroupNorm(GN_GROUPS, chs)
    return nn.BatchNorm2d(chs)


class ZeroPadShortcut(nn.Module):
    """Option A of the paper: subsample by striding, append zero channels. No parameters."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # x[::2] keeps ceil(H/2) rows: the size a 3x3, padding-1, stride-2 conv produces.
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_chs - self.in_chs))

    def extra_repr(self) -> str:
        return f"{self.in_chs}, {self.out_chs}, stride={self.stride}"


class AvgPoolSame(nn.Module):
    """2x2 average, stride 1, after padding one zero row and column at the bottom and right
    (TensorFlow's "same" padding for this kernel; the zeros count in the average). timm's
    avg-down shortcut uses it in dilated stages, where the stride-2 pool becomes stride 1
    (timm.layers.AvgPool2dSame); keeping it keeps the feature alignment of timm's weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 2, 1)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape: List[int] = [x.shape[0]] + [1] * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al. 2018): global pool, 1x1 down, ReLU, 1x1 up, sigmoid gate.
    The squeezed width is chs * ratio rounded to a multiple of `divisor` (timm's rule; 1
    keeps the paper's chs * ratio)."""

    def __init__(self, chs: int, ratio: float, divisor: int = 8):
        super().__init__()
        mid = make_divisible(chs * ratio, divisor)
        self.fc1 = nn.Conv2d(chs, mid, 1)
        self.fc2 = nn.Conv2d(mid, chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.fc1(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.fc2(s))


class GlobalPool(nn.Module):
    """The head's global pool (timm's pool types): "avg", "max", "avgmax" (their mean),
    "catavgmax" (both, concatenated: twice the features), or "" (none: the map passes
    through). Flattens to (N, C) unless the pool is "" ."""

    def __init__(self, pool_type: str = "avg"):
        super().__init__()
        self.pool_type = pool_type

    def feat_mult(self) -> int:
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "":
            return x
        if self.pool_type == "avg":
            return x.mean((2, 3))
        mx = x.amax((2, 3))
        if self.pool_type == "max":
            return mx
        if self.pool_type == "avgmax":
            return 0.5 * (x.mean((2, 3)) + mx)
        return torch.cat([x.mean((2, 3)), mx], 1)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


@contextlib.contextmanager
def _keep_norm_statistics(module: nn.Module):
    """Restore the BN running statistics a recomputation would update a second time."""
    saved = [(b, b.clone()) for m in module.modules() if isinstance(m, nn.BatchNorm2d)
             for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def checkpoint_stage(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a stage's blocks under activation checkpointing: each block's activations are
    recomputed in the backward pass (same random numbers, so drop-path agrees) and the
    recomputation leaves the BN running statistics as the forward pass set them."""
    lib = fused.library_in_use()  # the recomputation runs the forward's kernels (fused.py)
    for block in stage.children():
        x = checkpoint(block, x, use_reentrant=False,
                       context_fn=lambda b=block: (contextlib.nullcontext(),
                                                   _recompute(b, lib)))
    return x


@contextlib.contextmanager
def _recompute(block: nn.Module, lib):
    with fused.fused_norm_act(lib), _keep_norm_statistics(block):
        yield

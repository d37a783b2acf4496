"""BatchNorm in training mode fused with what follows it in a residual block: the residual
sum and the ReLU, y = relu(bn(x) [+ shortcut]), one C++ kernel forward (fused_bn.cpp: the
batch statistics, then one pass that normalises, adds and clips) and one backward (one pass
for the parameter gradients, one for the input's and the shortcut's), where ATen runs the
BN, the sum and the ReLU one pass over memory each, both ways.

Blocks take this path while `fused_norm_act(library)` is in effect (the training step enters
it where the trainer's `fused_bn` says so; runtime.fused_kernels builds the library) for a
BatchNorm2d in training mode on CPU maps in channels_last of fp32 or bf16; anything else (evaluation, other layouts, devices, norms, SE
or drop-path blocks, TorchScript, export) takes the modules' own path, unchanged. The
results match ATen's to fp32 rounding (bf16: one rounding of the sum where ATen rounds the
BN output and the sum each); they depend on the input alone, not on the thread count, so a
resumed run repeats bit for bit. `pool` runs the pooled CIFAR stem's 2x2 max-pool by the same
library, equal to ATen's bit for bit."""
from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .geometry import pair

CL = torch.channels_last
_state = threading.local()


@contextlib.contextmanager
def fused_norm_act(library: ctypes.CDLL | None) -> Iterator[None]:
    """Blocks run BN + sum + ReLU by `library`'s kernels (fused_bn.cpp as
    runtime.fused_kernels.library() builds it; where `usable`) inside this context, on this
    thread; None: the modules' own ops."""
    before = getattr(_state, "lib", None)
    _state.lib = library
    try:
        yield
    finally:
        _state.lib = before


def active() -> bool:
    return getattr(_state, "lib", None) is not None


def library_in_use() -> ctypes.CDLL | None:
    """The library of the fused_norm_act in effect on this thread, or None (for code that
    runs the forward again later: activation checkpointing)."""
    return getattr(_state, "lib", None)


def usable(bn: nn.Module, x: torch.Tensor, res: torch.Tensor | None = None) -> bool:
    """Whether the fused kernels take this BN of `x` (and the shortcut `res`)."""
    if type(bn) is not nn.BatchNorm2d or not bn.training or not bn.affine:
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or \
            x.dim() != 4 or x.shape[0] * x.shape[2] * x.shape[3] < 2 or \
            not x.is_contiguous(memory_format=CL):
        return False
    return res is None or (res.shape == x.shape and res.dtype == x.dtype and
                           res.device == x.device and res.is_contiguous(memory_format=CL))


def norm_act(bn: nn.BatchNorm2d, x: torch.Tensor, res: torch.Tensor | None = None,
             relu: bool = True) -> torch.Tensor:
    """relu(bn(x) [+ res]) (no ReLU with relu=False): fused inside fused_norm_act where
    `usable`, else by the modules' own ops."""
    if not active() or not usable(bn, x, res):
        out = bn(x)
        if res is not None:
            out = out + res
        return F.relu(out) if relu else out
    return _BNAct.apply(x, res, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                        _momentum(bn), bn.eps, relu, _state.lib)


def norm_act_pool(bn: nn.BatchNorm2d, x: torch.Tensor, maxpool: nn.Module) -> torch.Tensor:
    """maxpool(relu(bn(x))): the pooled CIFAR stem's BN, ReLU and 2x2 max-pool in one kernel
    inside fused_norm_act where `usable` and h and w are even (the full-size map is never
    written, and the backward runs over the pooled maps), else pool(maxpool, norm_act(bn, x))."""
    if not active() or not usable(bn, x) or not _pool2(maxpool) or x.shape[2] % 2 or \
            x.shape[3] % 2:
        return pool(maxpool, norm_act(bn, x))
    return _BNActPool.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                            _momentum(bn), bn.eps, _state.lib)


def _momentum(bn: nn.BatchNorm2d) -> float:
    """The running statistics' weight of this batch, counting it (as BatchNorm2d's forward)."""
    momentum = bn.momentum or 0.0
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # a cumulative average
            momentum = 1.0 / float(bn.num_batches_tracked)
    return momentum


def _update_running(running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                    mean: torch.Tensor, var: torch.Tensor, m: int, momentum: float) -> None:
    """BatchNorm2d's update of the running statistics: the unbiased variance of m values."""
    if running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * (m / (m - 1))).to(running_var.dtype),
                                                alpha=momentum)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _BNAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, res, weight, bias, running_mean, running_var, momentum, eps, relu, lib):
        c, m = x.shape[1], x.numel() // x.shape[1]
        weight_f, bias_f = weight.detach().float().contiguous(), bias.detach().float().contiguous()
        y = torch.empty_like(x, memory_format=CL)
        mean, var, invstd = torch.empty(c), torch.empty(c), torch.empty(c)
        lib.rk_bn_act_forward(int(x.dtype == torch.bfloat16), _ptr(x), _ptr(res), _ptr(y), m, c,
                              _ptr(weight_f), _ptr(bias_f), float(eps), int(relu),
                              torch.get_num_threads(), _ptr(mean), _ptr(var), _ptr(invstd))
        _update_running(running_mean, running_var, mean, var, m, momentum)
        ctx.save_for_backward(x, y, weight_f, mean, invstd)
        ctx.relu, ctx.has_res, ctx.lib = relu, res is not None, lib
        ctx.param_dtype = weight.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: a clear error
    def backward(ctx, dy):
        x, y, weight_f, mean, invstd = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous(memory_format=CL)
        c, m = x.shape[1], x.numel() // x.shape[1]
        need = ctx.needs_input_grad
        dx = torch.empty_like(x, memory_format=CL) if need[0] else None
        dres = torch.empty_like(x, memory_format=CL) if ctx.has_res and need[1] else None
        dweight, dbias = torch.empty(c), torch.empty(c)
        ctx.lib.rk_bn_act_backward(int(x.dtype == torch.bfloat16), _ptr(dy), _ptr(x), _ptr(y),
                                   _ptr(dx), _ptr(dres), m, c, _ptr(weight_f), _ptr(mean),
                                   _ptr(invstd), int(ctx.relu), torch.get_num_threads(),
                                   _ptr(dweight), _ptr(dbias))
        return (dx, dres, dweight.to(ctx.param_dtype) if need[2] else None,
                dbias.to(ctx.param_dtype) if need[3] else None, None, None, None, None, None, None)


def pool(maxpool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """maxpool(x): by the fused kernels' 2x2 max-pool (the pooled CIFAR stem's: kernel 2,
    stride 2, no padding, floor mode) inside fused_norm_act for CPU channels_last maps of
    fp32 or bf16, else by the module. Ties go to the first maximum in row order, as ATen's."""
    if not active() or not _pool2(maxpool) or x.device.type != "cpu" or \
            x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 4 or \
            x.shape[2] < 2 or x.shape[3] < 2 or not x.is_contiguous(memory_format=CL):
        return maxpool(x)
    return _MaxPool2.apply(x, _state.lib)


def _pool2(p: nn.Module) -> bool:
    """Whether `p` is the kernels' max-pool: 2x2, stride 2, no padding, floor mode."""
    return type(p) is nn.MaxPool2d and not p.ceil_mode and not p.return_indices and \
        (pair(p.kernel_size), pair(p.stride), pair(p.padding), pair(p.dilation)) == \
        ((2, 2), (2, 2), (0, 0), (1, 1))


class _MaxPool2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lib):
        n, c, h, w = x.shape
        y = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=CL)
        lib.rk_maxpool2_forward(int(x.dtype == torch.bfloat16), _ptr(x), _ptr(y), n, h, w, c,
                                torch.get_num_threads())
        ctx.save_for_backward(x)
        ctx.lib = lib
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        n, c, h, w = x.shape
        dy = dy.to(x.dtype).contiguous(memory_format=CL)
        dx = torch.empty_like(x, memory_format=CL)
        ctx.lib.rk_maxpool2_backward(int(x.dtype == torch.bfloat16), _ptr(x), _ptr(dy), _ptr(dx),
                                     n, h, w, c, torch.get_num_threads())
        return dx, None


class _BNActPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, lib):
        n, c, h, w = x.shape
        weight_f, bias_f = weight.detach().float().contiguous(), bias.detach().float().contiguous()
        p = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=CL)
        xw = torch.empty_like(p)  # x at each window's winner
        mean, var, invstd = torch.empty(3, c)
        lib.rk_bn_act_pool_forward(int(x.dtype == torch.bfloat16), _ptr(x), _ptr(p), _ptr(xw), n, h,
                                   w, c, _ptr(weight_f), _ptr(bias_f), float(eps),
                                   torch.get_num_threads(), _ptr(mean), _ptr(var), _ptr(invstd))
        _update_running(running_mean, running_var, mean, var, n * h * w, momentum)
        # x is kept only where its gradient is wanted (a frozen stem conv wants none)
        ctx.save_for_backward(x if ctx.needs_input_grad[0] else None, p, xw, weight_f, bias_f,
                              mean, invstd)
        ctx.shape, ctx.lib, ctx.param_dtype = (n, c, h, w), lib, weight.dtype
        return p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dp):
        x, p, xw, weight_f, bias_f, mean, invstd = ctx.saved_tensors
        n, c, h, w = ctx.shape
        dp = dp.to(p.dtype).contiguous(memory_format=CL)
        need = ctx.needs_input_grad
        dx = torch.empty((n, c, h, w), dtype=p.dtype, memory_format=CL) if need[0] else None
        dweight, dbias = torch.empty(2, c)
        ctx.lib.rk_bn_act_pool_backward(int(p.dtype == torch.bfloat16), _ptr(dp), _ptr(p), _ptr(xw),
                                        _ptr(x), _ptr(dx), n, h, w, c, _ptr(weight_f), _ptr(bias_f),
                                        _ptr(mean), _ptr(invstd), torch.get_num_threads(),
                                        _ptr(dweight), _ptr(dbias))
        return (dx, dweight.to(ctx.param_dtype) if need[1] else None,
                dbias.to(ctx.param_dtype) if need[2] else None, None, None, None, None, None)

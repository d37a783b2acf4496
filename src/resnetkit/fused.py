"""BatchNorm in training mode fused with what follows it in a residual block: the residual
sum and the ReLU, y = relu(bn(x) [+ shortcut]), one C++ kernel forward (fused_bn.cpp: the
batch statistics, then one pass that normalises, adds and clips) and one backward (one pass
for the parameter gradients, one for the input's and the shortcut's), where ATen runs the
BN, the sum and the ReLU one pass over memory each, both ways.

Blocks take this path while `fused_norm_act(True)` is in effect (the training step enters
it where the trainer's `fused_bn` says so) for a BatchNorm2d in training mode on CPU maps in
channels_last of fp32 or bf16; anything else (evaluation, other layouts, devices, norms, SE
or drop-path blocks, TorchScript, export) takes the modules' own path, unchanged. The
results match ATen's to fp32 rounding (bf16: one rounding of the sum where ATen rounds the
BN output and the sum each); they depend on the input alone, not on the thread count, so a
resumed run repeats bit for bit."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

SOURCE = Path(__file__).resolve().parent / "fused_bn.cpp"
CL = torch.channels_last
_state = threading.local()


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """fused_bn.cpp built for this CPU's instruction sets (runtime.native.load_native) and
    its functions typed. Raises UserError when it cannot be built or loaded."""
    from .runtime import cpu_flags
    from .runtime.native import load_native
    try:
        so = load_native(SOURCE, ["-O3", "-march=native", "-fopenmp"],
                         key=",".join(sorted(cpu_flags())))
    except OSError as e:
        raise UserError(f"the fused BN kernels could not be built or loaded: {e}") from None
    p, i, f, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64
    so.rk_bn_act_forward.restype = so.rk_bn_act_backward.restype = i
    so.rk_bn_act_forward.argtypes = [i, p, p, p, i64, i, p, p, f, i, i, p, p, p]
    so.rk_bn_act_backward.argtypes = [i, p, p, p, p, p, i64, i, p, p, p, i, i, p, p]
    return so


def decide_fused(choice: str | bool, device: torch.device | str, channels_last: bool,
                 compiled: bool) -> tuple[bool, str]:
    """(fuse BN, the residual sum and ReLU in the training step?, why). "auto": on the CPU in
    channels_last, when the step is not compiled (TorchInductor fuses them itself) and the
    kernels build here. True where they cannot run is a UserError."""
    if choice not in ("auto", True, False):
        raise UserError(f"fused_bn must be auto, true or false, got {choice!r}")
    if choice is False:
        return False, "asked for"
    why = ("not on the CPU" if torch.device(device).type != "cpu" else
           "not channels_last" if not channels_last else
           "the step is compiled (TorchInductor fuses them)" if compiled else None)
    if why is None:
        try:
            library()
        except UserError as e:
            why = str(e)
    if why and choice is True:
        raise UserError(f"fused_bn=true cannot run here: {why}; set fused_bn=auto or false")
    return (False, why) if why else (True, "asked for" if choice is True else "CPU, channels_last")


@contextlib.contextmanager
def fused_norm_act(on: bool = True) -> Iterator[None]:
    """Blocks run BN + sum + ReLU fused (where `usable`) inside this context, on this
    thread."""
    before = getattr(_state, "on", False)
    _state.on = on
    try:
        yield
    finally:
        _state.on = before


def active() -> bool:
    return getattr(_state, "on", False)


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
    """relu(bn(x) [+ res]) (no ReLU with relu=False): fused where `usable`, else by the
    modules' own ops."""
    if not usable(bn, x, res):
        out = bn(x)
        if res is not None:
            out = out + res
        return F.relu(out) if relu else out
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    momentum = bn.momentum
    if momentum is None:  # a cumulative average, as BatchNorm2d's forward
        momentum = 1.0 / float(bn.num_batches_tracked)
    return _BNAct.apply(x, res, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                        momentum, bn.eps, relu)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _BNAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, res, weight, bias, running_mean, running_var, momentum, eps, relu):
        lib = library()
        c, m = x.shape[1], x.numel() // x.shape[1]
        weight_f, bias_f = weight.detach().float().contiguous(), bias.detach().float().contiguous()
        y = torch.empty_like(x, memory_format=CL)
        mean, var, invstd = torch.empty(c), torch.empty(c), torch.empty(c)
        lib.rk_bn_act_forward(int(x.dtype == torch.bfloat16), _ptr(x), _ptr(res), _ptr(y), m, c,
                              _ptr(weight_f), _ptr(bias_f), float(eps), int(relu),
                              torch.get_num_threads(), _ptr(mean), _ptr(var), _ptr(invstd))
        if running_mean is not None:  # BatchNorm2d's update: the unbiased variance
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * (m / (m - 1))).to(running_var.dtype),
                                                    alpha=momentum)
        ctx.save_for_backward(x, y, weight_f, mean, invstd)
        ctx.relu, ctx.has_res = relu, res is not None
        ctx.param_dtype = weight.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight_f, mean, invstd = ctx.saved_tensors
        dy = dy.to(x.dtype).contiguous(memory_format=CL)
        c, m = x.shape[1], x.numel() // x.shape[1]
        need = ctx.needs_input_grad
        dx = torch.empty_like(x, memory_format=CL) if need[0] else None
        dres = torch.empty_like(x, memory_format=CL) if ctx.has_res and need[1] else None
        dweight, dbias = torch.empty(c), torch.empty(c)
        library().rk_bn_act_backward(int(x.dtype == torch.bfloat16), _ptr(dy), _ptr(x), _ptr(y),
                                     _ptr(dx), _ptr(dres), m, c, _ptr(weight_f), _ptr(mean),
                                     _ptr(invstd), int(ctx.relu), torch.get_num_threads(),
                                     _ptr(dweight), _ptr(dbias))
        return (dx, dres, dweight.to(ctx.param_dtype) if need[2] else None,
                dbias.to(ctx.param_dtype) if need[3] else None, None, None, None, None, None)

"""The torch engine: eval mode, BN folded into the convs, channels_last, bf16 autocast where
the hardware has native bf16, the classifier kept in fp32, and torch.compile where it pays,
once per input shape, for the fp32/bf16 model and the int8 (PT2E) graph alike."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ...errors import UserError
from ...layers import FrozenBatchNorm2d
from ...model import ResNet
from ...runtime import decide_channels_last, decide_precision
from ...runtime.compiling import can_compile, own_code

BN_LIKE = (nn.BatchNorm2d, FrozenBatchNorm2d)  # what folds into a conv (GroupNorm does not)


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | FrozenBatchNorm2d) -> nn.Conv2d:
    """A conv equal to bn(conv(x)) in eval mode:
    W' = W * g / sqrt(var + eps), b' = (b - mean) * g / sqrt(var + eps) + beta."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def _fold_sequential(seq: nn.Sequential) -> None:
    names = list(seq._modules)
    for a, b in zip(names, names[1:]):
        if isinstance(seq._modules[a], nn.Conv2d) and isinstance(seq._modules[b], BN_LIKE):
            seq._modules[a] = fold_bn(seq._modules[a], seq._modules[b])
            seq._modules[b] = nn.Identity()


def fold_model(model: ResNet) -> ResNet:
    """Fold every BN that directly follows a conv, in place (the model must be in eval
    mode). Pre-activation blocks keep their BNs: a ReLU sits between each BN and the next
    conv, so there is nothing to fold into."""
    if model.training:
        raise UserError("fold BN only in eval mode: call model.eval() first")
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            _fold_sequential(m)
    if isinstance(model.bn1, BN_LIKE):
        stem_conv = model.conv1[-1] if isinstance(model.conv1, nn.Sequential) else model.conv1
        fused = fold_bn(stem_conv, model.bn1)
        if isinstance(model.conv1, nn.Sequential):
            model.conv1[-1] = fused
        else:
            model.conv1 = fused
        model.bn1 = nn.Identity()
    if not model.cfg.preact:
        for block in model.blocks():
            for i in (1, 2, 3):
                conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
                if conv is not None and isinstance(bn, BN_LIKE):
                    setattr(block, f"conv{i}", fold_bn(conv, bn))
                    setattr(block, f"bn{i}", nn.Identity())
    return model


def compile_pays(device: torch.device) -> bool:
    """Whether the torch engine compiles by default: wherever torch.compile can build kernels
    (CUDA; on the CPU, a C++ compiler). For inference it was faster in every case measured:
    on an AVX512-BF16 CPU without AMX, bf16 ResNet-50 at 224 ran at 46.9 img/s compiled
    against 44.8 eager and ResNet-20 at 28 at 6,072 against 5,603 (`resnetkit bench
    --compile`); on an AMX Sapphire Rapids 100 against 73. The price is tens of seconds of
    compiling on the first call of each new input shape. (Training decides per run:
    see runtime.compiling.decide_compile.)"""
    return can_compile(device)


class PerShape(nn.Module):
    """A forward function compiled by inductor once per input shape. Frozen (compiled on the
    CPU), the weights are constants of the graph: oneDNN's blocked weights are prepacked at
    compile time and the residual add and ReLU (or int8 requantization) fuse into the conv
    before them. Past MAX_SHAPES shapes, new ones run eagerly (the same numbers, slower).
    Not frozen, the function runs as torch.compile gives it (CUDA), or eagerly."""

    MAX_SHAPES = 8

    def _setup(self, eager: Callable[[torch.Tensor], torch.Tensor], compiled: bool,
               frozen: bool) -> None:
        self._eager, self.compiled, self.frozen = eager, compiled, frozen
        # frozen graphs are compiled per input shape: inductor's fused conv lowering fails on
        # a dynamic batch dimension (stride assertion, torch 2.13)
        self._run = (torch.compile(own_code(eager), dynamic=False if frozen else None)
                     if compiled else eager)
        self._shapes: set[tuple[int, ...]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            with torch.no_grad():
                return self._run(x)
        if tuple(x.shape) not in self._shapes:
            if len(self._shapes) >= self.MAX_SHAPES:  # more shapes run eagerly, uncompiled
                with torch.no_grad():
                    return self._eager(x)
            self._shapes.add(tuple(x.shape))
        import torch._inductor.config as inductor_config
        # compiling happens lazily, on the first call of each input shape: freezing must be
        # on whenever it may happen, and applies only to graphs that need no gradients.
        # cpp_wrapper: the graph's kernels are called from generated C++ instead of Python
        with torch.no_grad(), inductor_config.patch(freezing=True, cpp_wrapper=True):
            return self._run(x)


class InferenceModel(PerShape):
    """An optimised copy of a ResNet: features in bf16 (weights stored in bf16, or cast by
    autocast on each call) or fp32, the head (pooling and fc) in fp32.

    Compiled on the CPU, the weights are frozen (see PerShape). Measured side by side
    against compiling without freezing (21 interleaved rounds, 2 threads, AVX512-BF16):
    ResNet-20 at 28x28, batch 256, +12%; ResNet-50 at 224, batch 16, +3%. The graph's
    kernels are called from inductor's generated C++ wrapper rather than Python: a further
    +0.6% to +2.8% in three side-by-side runs (15-21 rounds each)."""

    engine = "torch"

    def __init__(self, model: ResNet, precision: str, channels_last: bool,
                 compiled: bool = False, bf16_weights: bool = False):
        super().__init__()
        self.model, self.precision, self.channels_last = model, precision, channels_last
        self.bf16_weights = bf16_weights
        device = next(model.parameters()).device
        self._setup(self._forward, compiled, compiled and device.type == "cpu")

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.bf16_weights:
            f = self.model.forward_features(x.to(torch.bfloat16))
        else:
            with torch.autocast(x.device.type, dtype=torch.bfloat16,
                                enabled=self.precision == "bf16"):
                f = self.model.forward_features(x)
        return self.model.forward_head(f.float())


class Int8Model(PerShape):
    """A converted PT2E graph (infer.quantize.quantize_graph), compiled per input shape with
    frozen weights: each dequantize -> conv -> quantize becomes one oneDNN int8 conv with
    prepacked weights. compile=False runs the reference float graph. Maps a float batch to
    fp32 logits."""

    engine, precision = "torch", "int8"

    def __init__(self, graph: torch.fx.GraphModule, compiled: bool = True):
        super().__init__()
        self.graph = graph
        self._setup(graph, compiled, compiled)


def optimized(model: ResNet, precision: str = "auto", channels_last: str | bool = "auto",
              fold: bool = True, compile: str | bool = "auto",
              bf16_weights: bool = False) -> InferenceModel:
    """A fast inference copy of `model` (the original is untouched); see
    infer.optimize.optimize for the arguments. Raises UserError for a precision other than
    auto, bf16 or fp32, or a compile other than auto, True or False."""
    device = next(model.parameters()).device
    if compile == "auto":
        compile = compile_pays(device)
    if compile not in (True, False):
        raise UserError(f"compile must be auto, True or False, got {compile!r}")
    precision = decide_precision(precision, device, choices=("bf16", "fp32"))
    cl = decide_channels_last(channels_last, precision, device, training=False)
    m = copy.deepcopy(model).eval()
    if fold:
        fold_model(m)
    if cl:
        m = m.to(memory_format=torch.channels_last)
    for p in m.parameters():
        p.requires_grad_(False)
    bf16_weights = bf16_weights and precision == "bf16"
    if bf16_weights:
        m.to(torch.bfloat16)
        m.fc.float()
    return InferenceModel(m, precision, cl, compile, bf16_weights).eval()

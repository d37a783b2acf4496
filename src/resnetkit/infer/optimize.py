"""The inference path: eval mode, BN folded into the convs, channels_last, bf16 autocast
where the hardware has native bf16, the classifier kept in fp32, torch.compile where it
pays."""
from __future__ import annotations

import copy
import os
import shutil
import types
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..layers import FrozenBatchNorm2d
from ..model import ResNet
from ..runtime import decide_channels_last, decide_precision


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


def _own_code(method):
    """The bound method with a code object of its own. torch.compile keeps its compiled
    graphs, and its limit of 8 of them, per code object: without a copy every InferenceModel
    of the process would share one cache, and past 8 models or shapes in all, new ones would
    silently run uncompiled."""
    f = method.__func__
    copy_ = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__,
                               f.__defaults__, f.__closure__)
    return types.MethodType(copy_, method.__self__)


class InferenceModel(nn.Module):
    """An optimised copy of a ResNet: features in bf16 (weights stored in bf16, or cast by
    autocast on each call) or fp32, the head (pooling and fc) in fp32.

    Compiled on the CPU, the weights are frozen: inductor treats them as constants, so each
    conv's weight is cast and reordered into oneDNN's blocked layout once (prepacked) instead
    of on every call, and the residual add and ReLU become post-ops of the conv before them.
    Measured side by side against compiling without it (21 interleaved rounds, 2 threads,
    AVX512-BF16): ResNet-20 at 28x28, batch 256, +12%; ResNet-50 at 224, batch 16, +3%. The
    graph's kernels are called from inductor's generated C++ wrapper rather than Python: a
    further +0.6% to +2.8% in three side-by-side runs (15-21 rounds each).
    Each new input shape compiles once (seconds); past MAX_SHAPES shapes, new ones run
    eagerly."""

    MAX_SHAPES = 8
    engine = "torch"

    def __init__(self, model: ResNet, precision: str, channels_last: bool,
                 compiled: bool = False, bf16_weights: bool = False):
        super().__init__()
        self.model, self.precision, self.channels_last = model, precision, channels_last
        self.compiled, self.bf16_weights = compiled, bf16_weights
        device = next(model.parameters()).device
        self.frozen = compiled and device.type == "cpu"
        # frozen graphs are compiled per input shape: inductor's fused conv lowering fails on
        # a dynamic batch dimension (stride assertion, torch 2.13)
        self._run = (torch.compile(_own_code(self._forward),
                                   dynamic=False if self.frozen else None)
                     if compiled else self._forward)
        self._shapes: set[tuple[int, ...]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            return self._run(x)
        if tuple(x.shape) not in self._shapes:
            if len(self._shapes) >= self.MAX_SHAPES:  # more shapes run eagerly, uncompiled
                with torch.no_grad():
                    return self._forward(x)
            self._shapes.add(tuple(x.shape))
        import torch._inductor.config as inductor_config
        # compiling happens lazily, on the first call of each input shape: freezing must be
        # on whenever it may happen, and applies only to graphs that need no gradients.
        # cpp_wrapper: the graph's kernels are called from generated C++ instead of Python
        with torch.no_grad(), inductor_config.patch(freezing=True, cpp_wrapper=True):
            return self._run(x)

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


def compile_pays(device: torch.device) -> bool:
    """Whether optimize() compiles by default: wherever torch.compile can build kernels (CUDA;
    on the CPU, a C++ compiler). For inference it was faster in every case measured: on an
    AVX512-BF16 CPU without AMX, bf16 ResNet-50 at 224 ran at 46.9 img/s compiled against
    44.8 eager and ResNet-20 at 28 at 6,072 against 5,603 (`resnetkit bench --compile`);
    on an AMX Sapphire Rapids 100 against 73. The price is tens of seconds of
    compiling on the first call of each new input shape. (Training is not compiled: there
    it was slower for small images.)"""
    if device.type == "cuda":
        return True
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c)


def optimize(model: ResNet, precision: str = "auto", channels_last: str | bool = "auto",
             fold: bool = True, compile: str | bool = "auto",
             bf16_weights: bool = False, engine: str = "torch", calibration: Any = None,
             calibration_batches: int = 0, preprocess: dict[str, Any] | None = None,
             input_shape: tuple[int, ...] | None = None, data_dir: str | None = None,
             classes: list[str] | None = None, source: Any = "the model"):
    """A fast inference copy of `model` (the original is untouched).

    precision: "auto" (bf16 where the hardware has native bf16 and the engine runs bf16,
    else fp32; see infer.engines.resolve_precision), "bf16", "fp32".
    channels_last: "auto" (on with bf16 or CUDA), True, False. fold: fold BN into convs.
    compile: False, True, or "auto" (`compile_pays`): the first call of each new input shape
    then compiles, so use it for long-running inference, not for a handful of images. On
    the CPU the compiled graph freezes the weights (prepacked once for oneDNN, residual add
    and ReLU fused into the convs; see InferenceModel).
    bf16_weights: with bf16, store the feature weights in bf16 once instead of letting
    autocast cast them on every call (the fc stays fp32 either way): half the weight
    memory; no measurable speed difference on AVX512-BF16 (+1.7% ResNet-50 at 224, -0.6%
    ResNet-20 at 28, within the noise), so off by default.

    engine: "torch" (the path above), "onnxruntime", "openvino", or "auto": the engine
    measured fastest on this CPU for the precision and input shape (timed at the first call,
    or now when `input_shape` is given; cached per CPU model, see infer.engines).
    precision "int8" (never chosen by "auto": it needs calibration images) quantizes after
    training: calibration is a dataset spec ("fashion-mnist:512", its training split read
    with `preprocess`, a checkpoint's {"mean", "std", "image_size"}), a float tensor or a
    DataLoader of preprocessed images; calibration_batches limits it to that many batches
    of 32; classes: the checkpoint's class names, so that a spec calibrates on those
    classes where the model knows a subset of the dataset's. Every engine but torch at
    fp32/bf16 returns an infer.engines.Engine: called on a float NCHW tensor, it gives fp32
    logits; `.engine` and `.precision` say what runs. source: the model's name in messages
    (a model whose outputs on the calibration images are NaN or infinite is a UserError
    naming it)."""
    if precision == "int8" or engine != "torch":
        return _on_engine(model, precision, engine, compile, calibration, calibration_batches,
                          preprocess, input_shape, data_dir, classes, source)
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


def _on_engine(model: ResNet, precision: str, engine: str, compile: str | bool,
               calibration: Any, calibration_batches: int,
               preprocess: dict[str, Any] | None, input_shape: tuple[int, ...] | None,
               data_dir: str | None = None, classes: list[str] | None = None,
               source: Any = "the model"):
    """optimize() for int8 or another engine than torch (see infer.engines)."""
    from .engines import ENGINES, AutoEngine, build, installed, resolve_precision
    if engine != "auto" and engine not in ENGINES:
        raise UserError(f"engine must be auto or one of {', '.join(ENGINES)}, got {engine!r}")
    device = next(model.parameters()).device
    if device.type != "cpu" and (precision == "int8" or engine != "torch"):
        raise UserError("int8 and the ONNX Runtime and OpenVINO engines run on the CPU; "
                        "move the model there first")
    precision = decide_precision(resolve_precision(engine, precision, device), device,
                                 choices=("bf16", "fp32", "int8"))
    if engine != "auto" and installed(engine, precision):
        raise UserError(installed(engine, precision))
    batches = None
    if precision == "int8":
        from .quantize import CALIBRATION_BATCH, calibration_set
        if calibration_batches < 0:
            raise UserError(f"calibration_batches must be >= 0, got {calibration_batches}")
        size = input_shape[-1] if input_shape else 0
        batches = calibration_set(calibration, model.cfg.in_chans, size, preprocess,
                                  calibration_batches * CALIBRATION_BATCH, data_dir,
                                  classes=classes)
    elif calibration is not None:
        raise UserError("calibration images are for precision int8 only")
    model = copy.deepcopy(model).eval()
    if engine != "auto":
        # the exported files' input size: the shape's, else the checkpoint's, else the
        # calibration images' (else 224)
        size = (preprocess or {}).get("image_size", 0)
        shape = input_shape or ((1, model.cfg.in_chans, size, size) if size else None)
        return build(model, engine, precision, batches, compile, shape, source=source)
    auto = AutoEngine(model, precision, batches, compile, source)
    if input_shape is not None:
        auto.resolve(tuple(input_shape))
    return auto

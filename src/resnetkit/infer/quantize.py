"""Post-training static int8 through PyTorch's PT2E flow: calibration images prepared the way
a checkpoint says, torchao's X86InductorQuantizer (per-channel symmetric int8 weights,
per-tensor uint8 activations for every conv and the fc, BN folded first), and the converted
graph compiled by inductor with frozen weights.

The converted graph holds quantize/dequantize pairs around float ops; inductor's freezing
pass turns each dequantize -> conv -> quantize pattern into one oneDNN int8 conv with
prepacked weights. Without freezing there is no such fusion and the graph runs the float ops
plus the (de)quantize steps: slower than fp32 (14.0 against 37.5 img/s, ResNet-50 b16 at 224
on an AVX2-only EPYC, torch 2.13, torchao 0.18).

One addition to torchao's recipe (share_into_shortcuts): the parameter-free shortcut of
option A (subsample, then zero-pad the channels) reads the block input through the same
quantization as the next block's first conv. torchao's recipe quantizes neither slicing nor
padding, so the block that feeds such a shortcut kept its output in fp32: its fused conv and
residual sum wrote fp32, and separate kernels dequantized its input and quantized its
output again. Shared, that block writes uint8 like every other, and the shortcut's slice
and pad run on uint8 in one kernel: ResNet-20 at 1x28x28, batch 256, went from 11,991 to
19,557 img/s (2-core Sapphire Rapids, AMX), its logits' correlation with fp32's unchanged
(0.99992)."""
from __future__ import annotations

import copy
from typing import Any

import torch

from ..errors import UserError
from ..model import ResNet
from .backends.torch import Int8Model, fold_model
from .calibrate import CALIBRATION_BATCH, calibration_set, check_calibration_outputs


def share_into_shortcuts(graph: torch.fx.GraphModule) -> int:
    """Annotate, in a graph torchao's quantizer has annotated, the input of each chain of
    slices (option A's subsampling shortcut) with the quantization of another edge out of
    the same node into a quantized op (SharedQuantizationSpec: one observer, one scale and
    zero point for both). Returns how many were annotated."""
    from torchao.quantization.pt2e.quantizer import (QuantizationAnnotation,
                                                     SharedQuantizationSpec)
    key = "quantization_annotation"
    done = 0
    for node in graph.graph.nodes:
        src = node.args[0] if node.args else None
        if node.target is not torch.ops.aten.slice.Tensor or key in node.meta \
                or not isinstance(src, torch.fx.Node) or src.target is node.target:
            continue
        quantized = next((u for u in src.users if u is not node and key in u.meta
                          and src in u.meta[key].input_qspec_map), None)
        if quantized is not None:
            node.meta[key] = QuantizationAnnotation(
                input_qspec_map={src: SharedQuantizationSpec((src, quantized))},
                _annotated=True)
            done += 1
    return done


def quantize_graph(model: ResNet, batches: list[torch.Tensor],
                   source: Any = "the model") -> torch.fx.GraphModule:
    """The model with static int8 quantization inserted by torchao's X86InductorQuantizer
    (PT2E: exported with a dynamic batch, prepared, calibrated on `batches`, converted).
    The result runs in float (quantize/dequantize around each conv and the fc) until
    inductor compiles it; see Int8Model. Raises UserError naming `source` where the model's
    outputs on the calibration images are not finite (see check_calibration_outputs)."""
    try:
        from torchao.quantization.pt2e import (allow_exported_model_train_eval,
                                               move_exported_model_to_eval)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        raise UserError("int8 with the torch engine needs torchao: pip install "
                        "'resnetkit[int8]'") from None
    m = fold_model(copy.deepcopy(model).eval())
    for p in m.parameters():
        p.requires_grad_(False)
    example = batches[0][:2] if len(batches[0]) >= 2 else torch.cat(batches)[:2]
    batch = torch.export.Dim("batch", min=1, max=4096)
    graph = torch.export.export(m, (example,), dynamic_shapes={"x": {0: batch}}).module()
    class Quantizer(xiq.X86InductorQuantizer):
        def annotate(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
            gm = super().annotate(gm)
            share_into_shortcuts(gm)
            return gm

    quantizer = Quantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    # calibration runs the float model (observers only record ranges), so its outputs are
    # checked for free
    check_calibration_outputs(prepared, batches, source, fallback=m)
    # .eval() on it (as evaluate() does with any module) then switches the graph's mode
    # properly instead of raising
    return allow_exported_model_train_eval(move_exported_model_to_eval(convert_pt2e(prepared)))


def quantize(model: ResNet, calibration: Any, calibration_batches: int = 0,
             compile: bool = True, image_size: int = 0,
             preprocess: dict[str, Any] | None = None, data_dir: str | None = None,
             classes: list[str] | None = None, source: Any = "the model") -> Int8Model:
    """An int8 copy of `model` for the torch engine (the original is untouched).

    calibration: see calibration_set; calibration_batches: how many batches of
    CALIBRATION_BATCH images to use (0: all given, or DEFAULT_IMAGES from a dataset);
    source: the model's name in messages (see quantize_graph)."""
    if calibration_batches < 0:
        raise UserError(f"calibration_batches must be >= 0, got {calibration_batches}")
    batches = calibration_set(calibration, model.cfg.in_chans, image_size, preprocess,
                              calibration_batches * CALIBRATION_BATCH, data_dir,
                              classes=classes)
    return Int8Model(quantize_graph(model, batches, source), compiled=compile)

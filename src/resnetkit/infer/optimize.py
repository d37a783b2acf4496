"""optimize(model): the Python API's fast inference copy of a model in memory, on any engine
and at any precision (a thin door to infer.runner.open_runner)."""
from __future__ import annotations

from typing import Any

from ..model import ResNet
from .backends.torch import InferenceModel, compile_pays, fold_bn, fold_model
from .runner import RunConfig, open_runner
from .source import Source

__all__ = ["InferenceModel", "compile_pays", "fold_bn", "fold_model", "optimize"]


def optimize(model: ResNet, precision: str = "auto", channels_last: str | bool = "auto",
             fold: bool = True, compile: str | bool = "auto",
             bf16_weights: bool = False, engine: str = "torch", calibration: Any = None,
             calibration_batches: int = 0, preprocess: dict[str, Any] | None = None,
             input_shape: tuple[int, ...] | None = None, data_dir: str | None = None,
             classes: list[str] | None = None, source: Any = "the model",
             direct: str | bool = "auto"):
    """A fast inference copy of `model` (the original is untouched).

    precision: "auto" (bf16 where the hardware has native bf16 and the engine runs bf16,
    else fp32; see infer.runner.resolve_precision), "bf16", "fp32".
    channels_last: "auto" (on with bf16 or CUDA), True, False. fold: fold BN into convs.
    compile: False, True, or "auto" (`compile_pays`): the first call of each new input shape
    then compiles, so use it for long-running inference, not for a handful of images. On
    the CPU the compiled graph freezes the weights (prepacked once for oneDNN, residual add
    and ReLU fused into the convs; see backends.torch.PerShape).
    direct: the torch engine's direct oneDNN path (no framework between the convs, NHWC
    throughout, nothing to compile: a plan per input shape in well under a second), taken
    by "auto" on the CPU where `pip install 'resnetkit[onednn]'` put oneDNN and the model
    is one it runs, for int8 always and for fp32/bf16 unless compile=True, fold=False,
    channels_last=False or bf16_weights ask for the PyTorch path (see
    infer.runner.RunConfig); True requires it, False keeps to PyTorch.
    bf16_weights: with bf16, store the feature weights in bf16 once instead of letting
    autocast cast them on every call (the fc stays fp32 either way): half the weight
    memory; no measurable speed difference on AVX512-BF16 (+1.7% ResNet-50 at 224, -0.6%
    ResNet-20 at 28, within the noise), so off by default.

    engine: "torch" (the path above), "onnxruntime", "openvino", or "auto": the engine
    measured fastest on this CPU for the precision and input shape (timed at the first call,
    or now when `input_shape` is given; cached per CPU model, see infer.auto).
    precision "int8" (never chosen by "auto": it needs calibration images) quantizes after
    training: calibration is a dataset spec ("fashion-mnist:512", its training split read
    with `preprocess`, a checkpoint's {"mean", "std", "image_size"}), a float tensor or a
    DataLoader of preprocessed images; calibration_batches limits it to that many batches
    of 32; classes: the checkpoint's class names, so that a spec calibrates on those
    classes where the model knows a subset of the dataset's. source: the model's name in
    messages (a model whose outputs on the calibration images are NaN or infinite is a
    UserError naming it).

    Returns the torch engine's module for torch at fp32 or bf16 (an InferenceModel, or a
    backends.onednn.OneDnnResNet on the direct path), else an
    infer.runner.Runner: called on a float NCHW tensor, it gives fp32 logits; `.engine` and
    `.precision` say what runs. Raises UserError for what cannot run here."""
    config = RunConfig(engine=engine, precision=precision, calibration=calibration,
                       calibration_batches=calibration_batches, data_dir=data_dir,
                       shape=tuple(input_shape) if input_shape else None, compile=compile,
                       channels_last=channels_last, fold=fold, bf16_weights=bf16_weights,
                       direct=direct)
    runner = open_runner(Source.of_model(model, preprocess, classes, source), config)
    return runner.module if engine == "torch" and runner.precision != "int8" else runner

"""Post-training static int8 through PyTorch's PT2E flow: calibration images prepared the way
a checkpoint says, torchao's X86InductorQuantizer (per-channel symmetric int8 weights,
per-tensor uint8 activations for every conv and the fc, BN folded first), and the converted
graph compiled by inductor with frozen weights.

The converted graph holds quantize/dequantize pairs around float ops; inductor's freezing
pass turns each dequantize -> conv -> quantize pattern into one oneDNN int8 conv with
prepacked weights. Without freezing there is no such fusion and the graph runs the float ops
plus the (de)quantize steps: slower than fp32 (14.0 against 37.5 img/s, ResNet-50 b16 at 224
on an AVX2-only EPYC, torch 2.13, torchao 0.18)."""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import UserError
from ..model import ResNet

MIN_IMAGES = 2  # per-tensor activation ranges from a single image describe that image only
DEFAULT_IMAGES = 512
CALIBRATION_BATCH = 32


def parse_calibration(spec: str) -> tuple[str, int]:
    """"fashion-mnist" -> ("fashion-mnist", DEFAULT_IMAGES); "folder:DIR:300" -> ("folder:DIR",
    300): a trailing ":N" is the number of training images to calibrate on."""
    name, _, last = spec.rpartition(":")
    if name and last.isdigit():
        return name, int(last)
    if name and last.lstrip("-").isdigit():
        raise UserError(f"the calibration image count must be >= {MIN_IMAGES}, got {last}")
    return spec, DEFAULT_IMAGES


def calibration_set(calibration: Any, in_chans: int, image_size: int = 0,
                    preprocess: dict[str, Any] | None = None, limit: int = 0,
                    data_dir: str | None = None, batch_size: int = CALIBRATION_BATCH,
                    classes: list[str] | None = None) -> list[torch.Tensor]:
    """Calibration batches (float NCHW, preprocessed) from any of:
    a dataset spec ("fashion-mnist", "folder:DIR", ...; a trailing ":N" takes N images) whose
    training split is read at the checkpoint's size and normalised with its `preprocess`
    (mean, std, image_size, resize, interpolation); a float tensor (N, C, H, W) already
    preprocessed; or an iterable of such tensors or of (tensor, label) pairs (a DataLoader).
    At most `limit` images are used (0: for a spec, DEFAULT_IMAGES; else all). classes: the
    checkpoint's class names; a dataset spec then gives images of those classes only, where
    the model was trained on a subset of the dataset's classes.

    Raises UserError for no data, fewer than MIN_IMAGES images, or images whose channels or
    size differ from the model's."""
    image_size = image_size or (preprocess or {}).get("image_size", 0)
    if calibration is None or (isinstance(calibration, str) and not calibration.strip()):
        raise UserError("int8 needs calibration images: pass calibration= (a dataset such as "
                        "fashion-mnist, a tensor or a DataLoader), or --calibration on the "
                        "command line")
    if isinstance(calibration, str):
        batches = _from_dataset(calibration, in_chans, image_size, preprocess, limit,
                                data_dir, batch_size, classes)
    else:
        batches = _from_tensors(calibration, limit, batch_size)
    n = sum(len(b) for b in batches)
    if n == 0:
        raise UserError("the calibration set is empty: int8 needs real images to measure "
                        "the activation ranges")
    if n < MIN_IMAGES:
        raise UserError(f"the calibration set holds {n} image; int8 needs at least "
                        f"{MIN_IMAGES} (a few hundred measure the activation ranges well)")
    shape = tuple(batches[0].shape[1:])
    for b in batches:
        if b.dim() != 4 or tuple(b.shape[1:]) != shape:
            raise UserError(f"calibration images must all be C x H x W of one size; got "
                            f"{tuple(b.shape[1:])} after {shape}")
    want = f"{in_chans}x{image_size}x{image_size}" if image_size else f"{in_chans} channels"
    if shape[0] != in_chans or (image_size and shape[1:] != (image_size, image_size)):
        raise UserError(f"calibration images are {'x'.join(map(str, shape))}, the model "
                        f"takes {want}")
    return batches


def _from_tensors(data: Any, limit: int, batch_size: int) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        data = [data] if data.dim() != 3 else [data[None]]
    out, n = [], 0
    try:
        items: Iterable = iter(data)
    except TypeError:
        raise UserError(f"calibration must be a dataset name, a tensor or an iterable of "
                        f"batches, not {type(data).__name__}") from None
    for item in items:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise UserError("calibration batches must be float tensors (N, C, H, W), "
                            "preprocessed as the model expects")
        x = x[None] if x.dim() == 3 else x
        if limit:
            x = x[:limit - n]
        if len(x):
            out += list(x.float().split(batch_size))
            n += len(x)
        if limit and n >= limit:
            break
    return out


def _from_dataset(spec: str, in_chans: int, image_size: int, pre: dict[str, Any] | None,
                  limit: int, data_dir: str | None, batch_size: int,
                  classes: list[str] | None = None) -> list[torch.Tensor]:
    from ..data import load_dataset, materialize, restrict_to_classes
    from ..data.readers import ArrayDataset
    from ..evaluate import preprocess
    name, count = parse_calibration(spec)
    count = limit or count
    if pre is None:
        raise UserError("a calibration dataset needs the model's preprocessing (mean, std, "
                        "input size): quantize a trained checkpoint, or pass preprocessed "
                        "tensors")
    size = pre.get("image_size", image_size) or image_size
    ds = load_dataset(name, "train", data_dir, size, in_chans, resize=pre.get("resize", 0),
                      interpolation=pre.get("interpolation", "bilinear"))
    if isinstance(ds, ArrayDataset):
        ds = restrict_to_classes(ds, classes)
    # a fixed random draw over the whole split: the first N images of a folder would be the
    # first classes only
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:count]
    if isinstance(ds, ArrayDataset):
        ds = ds.subset(keep.sort().values)
    else:  # a folder: the draw is decoded, then kept to the classes (fewer images)
        ds = restrict_to_classes(materialize(torch.utils.data.Subset(ds, keep.tolist()),
                                             classes=ds.classes), classes)
    chans = ds.images.shape[1] if len(ds) else in_chans
    if chans != in_chans:
        raise UserError(f"{name} has {chans}-channel images, the model takes {in_chans}")
    return [preprocess(ds.images[i:i + batch_size], pre["mean"], pre["std"], size)
            for i in range(0, len(ds), batch_size)]


def quantize_graph(model: ResNet, batches: list[torch.Tensor]) -> torch.fx.GraphModule:
    """The model with static int8 quantization inserted by torchao's X86InductorQuantizer
    (PT2E: exported with a dynamic batch, prepared, calibrated on `batches`, converted).
    The result runs in float (quantize/dequantize around each conv and the fc) until
    inductor compiles it; see Int8Model."""
    try:
        from torchao.quantization.pt2e import (allow_exported_model_train_eval,
                                               move_exported_model_to_eval)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        raise UserError("int8 with the torch engine needs torchao: pip install "
                        "'resnetkit[int8]'") from None
    from .optimize import fold_model
    m = fold_model(copy.deepcopy(model).eval())
    for p in m.parameters():
        p.requires_grad_(False)
    example = batches[0][:2] if len(batches[0]) >= 2 else torch.cat(batches)[:2]
    batch = torch.export.Dim("batch", min=1, max=4096)
    graph = torch.export.export(m, (example,), dynamic_shapes={"x": {0: batch}}).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for x in batches:
            prepared(x)
    # .eval() on it (as evaluate() does with any module) then switches the graph's mode
    # properly instead of raising
    return allow_exported_model_train_eval(move_exported_model_to_eval(convert_pt2e(prepared)))


class Int8Model(nn.Module):
    """A converted PT2E graph, compiled per input shape by inductor with frozen weights
    (oneDNN int8 convs with prepacked weights, see the module's docstring), or run as the
    reference float graph with compile=False. Maps a float batch to fp32 logits."""

    engine, precision = "torch", "int8"
    MAX_SHAPES = 8

    def __init__(self, graph: torch.fx.GraphModule, compiled: bool = True):
        super().__init__()
        self.graph, self.compiled = graph, compiled
        self._run = torch.compile(graph, dynamic=False) if compiled else graph
        self._shapes: set[tuple[int, ...]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compiled:
            with torch.no_grad():
                return self.graph(x)
        if tuple(x.shape) not in self._shapes:
            if len(self._shapes) >= self.MAX_SHAPES:
                with torch.no_grad():
                    return self.graph(x)
            self._shapes.add(tuple(x.shape))
        import torch._inductor.config as inductor_config
        with torch.no_grad(), inductor_config.patch(freezing=True, cpp_wrapper=True):
            return self._run(x)


def quantize(model: ResNet, calibration: Any, calibration_batches: int = 0,
             compile: bool = True, image_size: int = 0,
             preprocess: dict[str, Any] | None = None, data_dir: str | None = None,
             classes: list[str] | None = None) -> Int8Model:
    """An int8 copy of `model` for the torch engine (the original is untouched).

    calibration: see calibration_set; calibration_batches: how many batches of
    CALIBRATION_BATCH images to use (0: all given, or DEFAULT_IMAGES from a dataset)."""
    if calibration_batches < 0:
        raise UserError(f"calibration_batches must be >= 0, got {calibration_batches}")
    batches = calibration_set(calibration, model.cfg.in_chans, image_size, preprocess,
                              calibration_batches * CALIBRATION_BATCH, data_dir,
                              classes=classes)
    return Int8Model(quantize_graph(model, batches), compiled=compile)

"""The torch engine's direct path: a post-activation ResNet run by oneDNN primitives with no
framework between them (onednn_resnet.cpp, built on first use against the oneDNN of the
`onednn` extra and loaded with ctypes). Activations stay in one layout at the run's
precision from the input to the head (`layout_for`: channels in blocks of 16 for fp32 and
bf16 on AVX-512 CPUs without AMX, NHWC otherwise); every conv has its BN folded in and its
ReLU and residual sum fused, the sum written in place into the shortcut's buffer; buffers
are reused. int8 keeps u8
activations after each ReLU and s8 where signed (the input, the projections), with the
ranges calibrated by torchao's observers (those of the x86 PT2E quantizer) and per-channel
symmetric weights. The classifier runs in torch at fp32.

What it runs: BasicBlock and Bottleneck nets (grouped, dilated, plain, options A/B/C, the
imagenet/deep/CIFAR stems, ResNet-D's average-pooled projections); `unsupported(model)`
names what it does not (pre-activation blocks, SE, pools other than avg), and the caller
then takes the PyTorch path. This module is the only one that talks to that library."""
from __future__ import annotations

import copy
import ctypes
import functools
import sysconfig
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import UserError
from ...geometry import check_input, pair
from ...layers import ZeroPadShortcut
from ...model import ResNet
from ...runtime import cpu_flags, last_level_cache_bytes
from ...runtime.compiling import cxx
from ...runtime.native import load_native
from ...untrusted import shown
from ..calibrate import check_calibration_outputs
from .torch import BN_LIKE, fold_model

SOURCE = Path(__file__).resolve().parent.parent.parent / "onednn_resnet.cpp"
PRECISIONS = ("fp32", "bf16", "int8")
# the activations' layouts: the channels' block size (0: NHWC)
LAYOUTS = {"nhwc": 0, "nChw8c": 8, "nChw16c": 16}
_CODES = {"fp32": 0, "bf16": 1, "int8": 2}
# a batch runs in chunks of images whose three largest maps fill at most this share of the
# last-level cache (see chunk_for); no chunk is smaller than CHUNK_MIN images
CACHE_SHARE = 0.5
CHUNK_MIN = 8
# input shapes kept built at once (each holds its activation buffers; packed weights are
# shared where the layout agrees): a server sees every batch size up to its largest
MAX_PLANS = 32


def _dirs() -> tuple[Path, Path]:
    data = Path(sysconfig.get_paths()["data"])
    return data / "include", data / "lib"


def unavailable() -> str | None:
    """None when the direct path can be built here, else why not."""
    include, lib = _dirs()
    if not (include / "oneapi" / "dnnl" / "dnnl.hpp").is_file() or \
            not any(lib.glob("libdnnl.so*")):
        return ("the direct oneDNN path needs oneDNN's library and headers: pip install "
                "'resnetkit[onednn]'")
    if not cxx():
        return "the direct oneDNN path needs a C++ compiler (g++ or $CXX)"
    if not SOURCE.is_file():
        return f"{SOURCE.name} is missing from the installed package"
    return None


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """onednn_resnet.cpp built and loaded (runtime.native.load_native: cached beside the
    weights, one build per source, compiler and oneDNN), its functions typed. Raises UserError
    when it cannot be."""
    why = unavailable()
    if why:
        raise UserError(why)
    include, lib = _dirs()
    dnnl = sorted(lib.glob("libdnnl.so*"))[-1].resolve()
    try:
        so = load_native(SOURCE, ["-O2", "-fopenmp", f"-I{include}", f"-L{lib}", "-ldnnl",
                                  f"-Wl,-rpath,{lib}"], key=f"{dnnl}|{dnnl.stat().st_size}")
    except OSError as e:
        raise UserError(f"the direct oneDNN path could not be built or loaded: {e}") from None
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    for name, res, args in (
            ("rk_error", ctypes.c_char_p, []),
            ("rk_set_verbose", i, [i]),
            ("rk_net_new", p, [i, i, i, f]),
            ("rk_net_free", None, [p]),
            ("rk_add_conv", i, [p, i, i, p, p, p, p, p, f, f, f, i, i, i]),
            ("rk_add_pool", i, [p, i, i, i, i, i, i, i, i, i, i]),
            ("rk_set_output", None, [p, i]),
            ("rk_set_layout", i, [p, i]),
            ("rk_plan", p, [p, i, i, i, i]),
            ("rk_plan_features", i, [p]),
            ("rk_plan_block", i, [p]),
            ("rk_plan_map_bytes", ctypes.c_int64, [p]),
            ("rk_plan_free", None, [p]),
            ("rk_run", i, [p, p, p, f, i])):
        fn = getattr(so, name)
        fn.restype, fn.argtypes = res, args
    return so


def layout_for(precision: str) -> str:
    """The activations' layout for `precision` on this CPU (as far as ONEDNN_MAX_CPU_ISA lets
    oneDNN see it). nChw16c for fp32 and bf16 on AVX-512 CPUs without AMX: on an AMD EPYC
    (Zen 5) oneDNN 3.2's blocked AVX-512 kernels ran ResNet-20 (256x1x28x28) 1.08x faster
    than its NHWC ones in bf16 and 1.15x in fp32, ResNet-50 (16x3x224x224) 1.04x in bf16 and
    level in fp32. NHWC elsewhere: int8 (no blocked first-layer kernels), AVX2 (nChw8c ran
    ResNet-20 at 0.94x), and AMX, whose bf16 kernels read NHWC."""
    flags = cpu_flags()
    if precision == "int8" or "avx512f" not in flags or \
            (precision == "bf16" and "amx_bf16" in flags):
        return "nhwc"
    return "nChw16c"


def chunk_for(n: int, map_bytes: int, cache_bytes: int) -> int:
    """Images per run for a batch of `n` whose largest activation map takes `map_bytes` (all
    n images): the largest power of two whose three largest maps (a conv's input, output and
    shortcut) fit in CACHE_SHARE of the last-level cache, so that a layer's maps stay in the
    cache for the next (ResNet-20 at batch 256 in fp32, a 12.8 MB map: 1.11-1.18x in chunks
    of 64 against one run, capped at AVX2 on an AMD EPYC with a 32 MB L3, 1.12x natively; in
    bf16 and int8, whose maps are half and a quarter of that, chunks gave nothing). `n`
    itself where the whole batch fits, the cache size is unknown (0), or the chunk would be
    under CHUNK_MIN images (ResNet-50 at 224x224: 3.2 MB a map per image, chunks of 4 and 8
    measured level)."""
    if n <= 0 or map_bytes <= 0 or cache_bytes <= 0:
        return n
    fit = int(CACHE_SHARE * cache_bytes // (3 * map_bytes / n))
    if fit >= n or fit < CHUNK_MIN:
        return n
    return 1 << (fit.bit_length() - 1)


def set_verbose(level: int) -> None:
    """oneDNN's verbose level in the direct path's library (0 off, 2 every primitive's
    execution and time on stdout): torch.backends.mkldnn.verbose reaches only PyTorch's own
    oneDNN."""
    library().rk_set_verbose(level)


def unsupported(model: ResNet) -> str | None:
    """None when the direct path runs `model`, else what it lacks."""
    cfg = model.cfg
    checks = ((not cfg.preact, "pre-activation blocks"), (not cfg.se_ratio, "SE"),
              (not (cfg.avg_down and cfg.output_stride), "avg-down projections in dilated stages"),
              (cfg.stem_norm, "a stem without BN"),
              (getattr(model.avgpool, "pool_type", None) == "avg", "a global pool other than avg"),
              (not model.features_only, "a features-only backbone"),
              (isinstance(model.fc, nn.Linear), "a model without a classifier"),
              (model.maxpool.__class__ in (nn.Identity, nn.MaxPool2d), "this max-pool"))
    for ok, what in checks:
        if not ok:
            return f"the direct oneDNN path does not run {what}"
    for m in model.modules():
        if isinstance(m, (nn.Conv2d,)) and m.padding_mode != "zeros":
            return "the direct oneDNN path does not run padding modes other than zeros"
        if isinstance(m, nn.GroupNorm) or (isinstance(m, nn.modules.batchnorm._NormBase)
                                           and not isinstance(m, BN_LIKE)):
            return "the direct oneDNN path runs BatchNorm only (folded into the convs)"
    return None


class _Tensor:
    """A logical activation: its producer's observer key, and whether it may be negative."""
    def __init__(self, index: int, signed: bool):
        self.index, self.signed = index, signed


class _Graph:
    """The folded model as a list of ops on logical tensors (shape-free), with the module
    whose output is each tensor (what calibration observes)."""

    def __init__(self, model: ResNet):
        self.ops: list[dict[str, Any]] = []
        self.tensors: list[_Tensor] = []
        self.observed: dict[int, nn.Module] = {}  # tensor index -> module giving its value
        self.same_as: dict[int, int] = {}          # tensor index -> tensor sharing its range
        self.input = self._new(True)
        x = self._stem(model)
        for block in model.blocks():
            x = self._block(block, x)
        self.output = x

    def _new(self, signed: bool) -> _Tensor:
        t = _Tensor(len(self.tensors), signed)
        self.tensors.append(t)
        return t

    def _conv(self, conv: nn.Conv2d, src: _Tensor, relu: bool, observe: nn.Module | None,
              residual: _Tensor | None = None, weight: torch.Tensor | None = None) -> _Tensor:
        out = self._new(not relu)
        if observe is not None:
            self.observed[out.index] = observe
        self.ops.append(dict(kind="conv", conv=conv, src=src, dst=out, relu=relu,
                             residual=residual, weight=weight))
        return out

    def _stem(self, model: ResNet) -> _Tensor:
        x = self.input
        if isinstance(model.conv1, nn.Sequential):  # the deep stem: conv, ReLU, conv, ReLU, conv
            mods = [m for m in model.conv1 if not isinstance(m, nn.Identity)]
            convs = [m for m in mods if isinstance(m, nn.Conv2d)]
            relus = [m for m in mods if isinstance(m, nn.ReLU)]
            if len(convs) != len(relus) + 1:
                raise UserError("the direct oneDNN path does not run this stem")
            for conv, relu in zip(convs, relus):
                x = self._conv(conv, x, True, relu)
            x = self._conv(convs[-1], x, True, model.relu)
        else:
            x = self._conv(model.conv1, x, True, model.relu)
        if isinstance(model.maxpool, nn.MaxPool2d):
            pool = model.maxpool
            out = self._new(x.signed)
            self.same_as[out.index] = x.index  # the max keeps its input's range
            self.ops.append(dict(kind="pool", pool=pool, src=x, dst=out))
            x = out
        return x

    def _block(self, block: nn.Module, x: _Tensor) -> _Tensor:
        if not isinstance(block.se, nn.Identity):
            raise UserError("the direct oneDNN path does not run SE")
        last = 3 if hasattr(block, "conv3") else 2
        out = x
        for i in range(1, last):
            out = self._conv(getattr(block, f"conv{i}"), out, True, getattr(block, f"act{i}"))
        shortcut = block.downsample
        if shortcut is None:
            residual = None
        elif isinstance(shortcut, nn.Identity):
            residual = x
        elif isinstance(shortcut, ZeroPadShortcut):
            # option A (stride, then zero channels) is a 1x1 conv whose weights pick the
            # channels: exact in every precision (int8: 127 * (1/127) = 1)
            eye = torch.zeros(shortcut.out_chs, shortcut.in_chs, 1, 1)
            eye[torch.arange(shortcut.in_chs), torch.arange(shortcut.in_chs)] = 1.0
            conv = nn.Conv2d(shortcut.in_chs, shortcut.out_chs, 1, shortcut.stride, bias=False)
            residual = self._conv(conv, x, False, None, weight=eye)
            residual.signed = x.signed
            self.same_as[residual.index] = x.index
        else:
            mods = [m for m in shortcut if not isinstance(m, nn.Identity)]
            if mods and isinstance(mods[0], nn.AvgPool2d):  # ResNet-D: average, then project
                pooled = self._new(x.signed)
                self.same_as[pooled.index] = x.index  # an average stays within its input's range
                self.ops.append(dict(kind="pool", pool=mods[0], src=x, dst=pooled))
                x, mods = pooled, mods[1:]
            if len(mods) != 1 or not isinstance(mods[0], nn.Conv2d):
                raise UserError("the direct oneDNN path does not run this shortcut")
            residual = self._conv(mods[0], x, False, shortcut)
        return self._conv(getattr(block, f"conv{last}"), out, True, getattr(block, f"act{last}"),
                          residual=residual)


def _slots(graph: _Graph) -> dict[int, int]:
    """A buffer slot per logical tensor, reused once the tensor is dead; a residual sum's
    output takes its shortcut's slot (the sum is written in place). Slot 0 is the input."""
    last_use: dict[int, int] = {}
    for i, op in enumerate(graph.ops):
        last_use[op["src"].index] = i
        if op.get("residual") is not None:
            last_use[op["residual"].index] = i
    last_use[graph.output.index] = len(graph.ops)
    slot = {graph.input.index: 0}
    free: list[int] = []
    count = 1
    for i, op in enumerate(graph.ops):
        dst = op["dst"].index
        if op.get("residual") is not None:
            slot[dst] = slot[op["residual"].index]
        elif free:
            slot[dst] = free.pop()
        else:
            slot[dst], count = count, count + 1
        for t in {op["src"].index} | ({op["residual"].index} if op.get("residual") else set()):
            if last_use.get(t) == i and slot[t] != slot[dst]:
                free.append(slot[t])
    return slot


def _calibrate(model: ResNet, graph: _Graph, batches: list[torch.Tensor] | None,
               source: Any) -> dict[int, float]:
    """The scale of every logical tensor from torchao's observers (HistogramObserver, as the
    x86 PT2E quantizer uses): u8 affine for ReLU outputs (zero point 0), s8 symmetric for
    signed ones. A model whose outputs on the calibration images are not finite is a
    UserError naming `source`."""
    if not batches:
        raise UserError("int8 needs calibration images")
    try:
        from torchao.quantization.pt2e.observer import HistogramObserver
    except ImportError:
        raise UserError("int8 with the torch engine needs torchao: pip install "
                        "'resnetkit[int8]'") from None
    observers: dict[int, Any] = {}

    def make(signed: bool):
        if signed:
            return HistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        return HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)

    hooks = []
    for index, module in graph.observed.items():
        observers[index] = make(graph.tensors[index].signed)
        hooks.append(module.register_forward_hook(
            lambda m, args, out, ob=observers[index]: _observe(ob, out)))
    observers[graph.input.index] = make(True)

    def observed(b: torch.Tensor) -> torch.Tensor:
        _observe(observers[graph.input.index], b)
        return model(b.float())
    try:
        check_calibration_outputs(observed, batches, source)
    finally:
        for h in hooks:
            h.remove()
    scales: dict[int, float] = {}
    for index, ob in observers.items():
        scale, zero = ob.calculate_qparams()
        scales[index] = float(scale)
        if int(zero) != 0:  # a ReLU output's range starts at 0; keep it exactly there
            scales[index] = float(ob.max_val) / 255.0
    for index, other in graph.same_as.items():
        scales[index] = scales[other]
    return scales


def _observe(observer: Any, x: torch.Tensor) -> None:
    """Record x's range; a map that overflowed is left to the output check, which names the
    model (the observer's own error would be a traceback)."""
    x = x.detach().float()
    if torch.isfinite(x).all():
        observer(x)


def _identity_weight(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Option A's 0/1 channel-picking weights in int8, exactly: 127 at scale 1/127 (an
    observer's symmetric scale, max/127.5, would shrink every value by 0.4%, so the upper
    half of the u8 range would come out a step low); rows of zeros at scale 1."""
    q = np.ascontiguousarray((w * 127).round().to(torch.int8).numpy())
    scale = np.where(w.flatten(1).amax(1).numpy() > 0, 1 / 127, 1.0).astype(np.float32)
    return q, scale


def _quantized_weight(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric int8 weights and their scales (torchao's
    PerChannelMinMaxObserver, as the x86 PT2E quantizer uses)."""
    from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver
    ob = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8,
                                  qscheme=torch.per_channel_symmetric)
    ob(w)
    scale, zero = ob.calculate_qparams()
    q = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8).int_repr()
    return (np.ascontiguousarray(q.numpy()),
            np.ascontiguousarray(scale.float().numpy()))


class _Native:
    """The library's network and its plans (one per input shape and thread count, the least
    recently used dropped past MAX_PLANS), owned by one object: copies of the module share
    it, and it is freed once, when the last of them goes. A lock keeps runs one at a time
    (the plans share their buffers)."""

    def __init__(self, lib: ctypes.CDLL, net: int):
        self.lib, self.net = lib, net
        self.plans: dict[tuple[int, ...], int] = {}
        self.chunks: dict[tuple[int, ...], int] = {}  # input shape and threads -> images a run
        self.lock = threading.Lock()

    def chunk(self, key: tuple[int, ...]) -> int:
        """Images per run for inputs of `key`'s shape (chunk_for, from the whole batch's
        plan: its largest map)."""
        if key not in self.chunks:
            if len(self.chunks) >= 4 * MAX_PLANS:
                self.chunks.clear()
            self.chunks[key] = chunk_for(key[0], self.lib.rk_plan_map_bytes(self.plan(key)),
                                         last_level_cache_bytes())
        return self.chunks[key]

    def runs(self, key: tuple[int, ...]) -> list[tuple[int, int]]:
        """(first image, plan) of each run a batch of `key`'s shape takes, plans built."""
        n, step = key[0], self.chunk(key)
        return [(i, self.plan((min(step, n - i), *key[1:]))) for i in range(0, n, step)]

    def plan(self, key: tuple[int, ...]) -> int:
        plan = self.plans.pop(key, None)
        if plan is None:
            n, c, h, w, threads = key
            plan = self.lib.rk_plan(self.net, n, h, w, threads)
            if not plan:
                raise UserError(f"the direct oneDNN path cannot run inputs of shape "
                                f"{[n, c, h, w]}: {self.lib.rk_error().decode()}")
            while len(self.plans) >= MAX_PLANS:
                self.lib.rk_plan_free(self.plans.pop(next(iter(self.plans))))
        self.plans[key] = plan  # the most recently used last
        return plan

    def __del__(self) -> None:
        for plan in self.plans.values():
            self.lib.rk_plan_free(plan)
        self.plans = {}
        if self.net:
            self.lib.rk_net_free(self.net)
            self.net = None


class OneDnnResNet(nn.Module):
    """`model` (a ResNet that `unsupported` accepts) on the direct oneDNN path at
    `precision` ("fp32", "bf16" or "int8"; int8 needs calibration `batches`). Called on a
    float NCHW batch, it gives fp32 logits; a plan is built per input shape (the first call
    of a shape takes well under a second for ResNet-50). `layout`: the activations' layout,
    "auto" (layout_for: the CPU's), "nhwc", "nChw8c" or "nChw16c" (blocked: fp32 and bf16;
    a plan whose layers lack a kernel in it runs NHWC, see layout_of)."""

    engine = "torch"

    compiled = False  # nothing to compile: a plan per input shape, built in well under a second

    def __init__(self, model: ResNet, precision: str, batches: list[torch.Tensor] | None = None,
                 source: Any = "the model", layout: str = "auto"):
        super().__init__()
        if precision not in PRECISIONS:
            raise UserError(f"the direct oneDNN path runs {', '.join(PRECISIONS)}, not "
                            f"{precision!r}")
        why = unsupported(model)
        if why:
            raise UserError(why)
        self.precision = precision
        self.layout = layout_for(precision) if layout == "auto" else layout
        if self.layout not in LAYOUTS:
            raise UserError(f"the direct oneDNN path's layout is auto, {', '.join(LAYOUTS)}; got "
                            f"{shown(repr(layout))}")
        lib = library()
        folded = fold_model(copy.deepcopy(model).float().eval())
        graph = _Graph(folded)
        scales = _calibrate(folded, graph, batches, source) if precision == "int8" else {}
        slots = _slots(graph)
        self.in_chans = model.cfg.in_chans
        with torch.device("meta"):  # the same net without weights: what input checks walk
            self._shape_model = (ResNet(model.cfg),)  # a tuple: not a submodule
        self.fc = copy.deepcopy(folded.fc).float()
        for p in self.fc.parameters():
            p.requires_grad_(False)
        net = lib.rk_net_new(_CODES[precision], self.in_chans, slots[graph.input.index],
                             scales.get(graph.input.index, 1.0))
        if not net:
            raise UserError(f"the direct oneDNN path: {lib.rk_error().decode()}")
        self._native = _Native(lib, net)
        self._check(lib.rk_set_layout(net, LAYOUTS[self.layout]))
        for op in graph.ops:
            src, dst = slots[op["src"].index], slots[op["dst"].index]
            if op["kind"] == "pool":
                pool = op["pool"]
                k, s, pd = (pair(pool.kernel_size), pair(pool.stride or pool.kernel_size),
                            pair(pool.padding))
                average = isinstance(pool, nn.AvgPool2d)
                self._check(lib.rk_add_pool(net, src, dst, *k, *s, *pd, int(average),
                                            int(pool.ceil_mode)))
                continue
            conv, res = op["conv"], op["residual"]
            w = (op["weight"] if op["weight"] is not None else conv.weight).detach().float()
            bias = (conv.bias.detach().float() if conv.bias is not None
                    else torch.zeros(conv.out_channels))
            geometry = np.array([conv.in_channels, conv.out_channels, *conv.kernel_size,
                                 *conv.stride, *_padding(conv), *conv.dilation, conv.groups],
                                dtype=np.int32)
            weight = np.ascontiguousarray(w.numpy())
            bias = np.ascontiguousarray(bias.numpy())
            if precision != "int8":
                qweight = wscale = None
            elif op["weight"] is not None:  # option A's fixed 0/1 weights
                qweight, wscale = _identity_weight(w)
            else:
                qweight, wscale = _quantized_weight(w)
            src_scale = scales.get(op["src"].index, 1.0)
            dst_scale = scales.get(op["dst"].index, 1.0)
            sum_scale = scales.get(res.index, 1.0) if res is not None else 0.0
            self._check(lib.rk_add_conv(
                net, src, dst, _ptr(geometry), _ptr(weight), _ptr(qweight), _ptr(bias),
                _ptr(wscale), src_scale, dst_scale, sum_scale, int(op["relu"]),
                int(res is not None), int(op["dst"].signed)))
        lib.rk_set_output(net, slots[graph.output.index])
        self._out_scale = scales.get(graph.output.index, 1.0)

    def _check(self, rc: int) -> None:
        if rc != 0:
            raise UserError(f"the direct oneDNN path: {self._native.lib.rk_error().decode()}")

    def prepare(self, shape: tuple[int, ...]) -> None:
        """Build the plan for inputs of `shape` (N, C, H, W) now: a UserError where the
        shape is not one the model takes, or oneDNN has no optimized kernel for a layer on
        this CPU."""
        self._runs(shape)

    def layout_of(self, shape: tuple[int, ...]) -> str:
        """The layout the plan for inputs of `shape` runs: `layout`, or NHWC where a layer
        has no oneDNN kernel in the blocked one (a few channels beside blocked maps)."""
        block = self._runs(shape, lambda runs: self._native.lib.rk_plan_block(runs[0][1]))
        return next(k for k, v in LAYOUTS.items() if v == block)

    def chunk_of(self, shape: tuple[int, ...]) -> int:
        """Images per run for inputs of `shape`: the whole batch, or chunks whose maps stay
        in the CPU's last-level cache (chunk_for)."""
        runs = self._runs(shape)
        return runs[1][0] if len(runs) > 1 else shape[0]

    def _runs(self, shape: tuple[int, ...], then: Any = None) -> Any:
        """The (first image, plan) of each run for inputs of `shape`, built (see prepare);
        with `then`, then(those) computed under the lock (a plan may be dropped once it is
        released)."""
        if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise UserError(f"an input shape is (N, C, H, W) in positive whole numbers, got "
                            f"{shape!r}")
        check_input(self._shape_model[0], torch.empty(shape, device="meta"))
        with self._native.lock:
            runs = self._native.runs((*shape, torch.get_num_threads()))
            return then(runs) if then else runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the model's own checks: channels, and a size every layer takes
        check_input(self._shape_model[0], x)
        if x.device.type != "cpu":
            raise UserError("the direct oneDNN path runs on the CPU")
        x = x.detach().float().contiguous()
        native, threads = self._native, torch.get_num_threads()
        if len(x) == 0:  # nothing to run: the eager model's (0, classes)
            feats = torch.empty(0, self.fc.in_features)
        else:
            with native.lock:
                runs = native.runs((*x.shape, threads))
                feats = torch.empty(x.shape[0], native.lib.rk_plan_features(runs[0][1]))
                for i, plan in runs:  # x and feats are contiguous: a run's rows are too
                    self._check(native.lib.rk_run(plan, x[i].data_ptr(), feats[i].data_ptr(),
                                                  self._out_scale, threads))
        with torch.no_grad():
            return self.fc(feats)

    def __copy__(self) -> "OneDnnResNet":  # the same native network, shared
        twin = type(self).__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def __deepcopy__(self, memo: dict) -> "OneDnnResNet":
        raise TypeError("the direct oneDNN path's model cannot be copied: build another")

    def __reduce__(self) -> Any:
        raise UserError("the direct oneDNN path's model cannot be pickled: save the checkpoint "
                        "and open it again")


def _padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        raise UserError("the direct oneDNN path runs convs with numeric padding only")
    return tuple(conv.padding)


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data

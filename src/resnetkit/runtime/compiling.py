"""Whether torch.compile can build kernels here, and whether compiling a training run pays."""
from __future__ import annotations

import os
import shutil
import types
from typing import Callable, Literal

import torch

from ..errors import UserError

# Eager training throughput as a fraction of the CPU's fp32 peak (hardware()), measured with
# ResNet-20 at batch 256 on 1x28x28 images (torch 2.13, 2 cores of an AMX Sapphire Rapids):
# bf16 channels_last 1,186 img/s x 185 MFLOP = 0.66 of the 333 GFLOP/s fp32 peak, fp32 NCHW
# 615 img/s = 0.34. The estimate of a run's length below uses the lower figures, rounded down.
EAGER_FRACTION = {"bf16": 0.6, "fp16": 0.6, "fp32": 0.3, "fp64": 0.15}
# Compiling a training step took 19-40 s on that machine (the first run 40 s, later ones less
# from Inductor's on-disk cache) and made ResNet-20's step 1.26x faster in bf16 (1,747 against
# 1,390 img/s) and 1.07x in fp32 with oneDNN capped at AVX2 (618 against 578): a run pays for
# it after about 5 minutes of eager training.
PAYS_AFTER_S = 300.0
# What compiling fuses is BN, ReLU and the additions, whose share of the step falls as the
# channels grow: ResNet-50 (stages of 256-2,048 channels, batch 32 at 224) measured 0.98x
# compiled (16.4 against 16.8 img/s, bf16), so only networks whose widest stage has at most
# this many channels are compiled by default.
NARROW_CHANNELS = 256


def can_compile(device: torch.device | str) -> bool:
    """Whether torch.compile can build kernels for `device`: on CUDA, Triton and a C compiler
    for its launcher; on the CPU, the C++ compiler TorchInductor calls (its config's
    cpp.cxx: $CXX, else g++ on Linux)."""
    if torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton
        return has_triton() and any(
            shutil.which(c) for c in (os.environ.get("CC", ""), "gcc", "cc", "clang") if c)
    return cxx() is not None


def cxx() -> str | None:
    """The C++ compiler TorchInductor calls (its config's cpp.cxx: $CXX, else g++ on Linux),
    as a path; None where there is none. resnetkit's own C++ (the direct oneDNN path) is
    built with it too."""
    from torch._inductor import config
    names = [os.environ.get("CXX", "")] + [c for c in config.cpp.cxx if isinstance(c, str)]
    return next((path for path in map(shutil.which, filter(None, names)) if path), None)


def own_code(fn: Callable) -> Callable:
    """`fn` with a code object of its own. torch.compile keeps its compiled graphs, and its
    limit of 8 of them, per code object: without a copy every model (or training step) of
    the process would share one cache, and past 8 models or shapes in all, new ones would
    silently run uncompiled."""
    if not isinstance(fn, types.MethodType):
        return fn  # a GraphModule: its forward is generated for it alone
    f = fn.__func__
    copy_ = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__,
                               f.__defaults__, f.__closure__)
    return types.MethodType(copy_, fn.__self__)


def estimated_train_s(flop: float, precision: str, peak_fp32_gflops: float | None) -> float:
    """Seconds an eager run of `flop` training FLOP would take at EAGER_FRACTION of the peak
    (inf where the peak is unknown)."""
    rate = (peak_fp32_gflops or 0.0) * 1e9 * EAGER_FRACTION.get(precision, 0.3)
    return flop / rate if rate > 0 else float("inf")


def decide_compile(choice: Literal["auto"] | bool, device: torch.device | str, precision: str,
                   run_seconds: Callable[[], float], world: int = 1, widest: int = 0
                   ) -> tuple[bool, str]:
    """(compile the training step?, why). "auto": where torch.compile can build kernels, for
    one process (DDP with a compiled step is not measured here), in fp32/bf16/fp16, for a
    network whose widest stage (`widest` channels) has at most NARROW_CHANNELS, when the
    run's estimated eager length (`run_seconds()`, asked only once every other rule holds)
    reaches PAYS_AFTER_S, so short runs (the quick demo) do not wait for a compiler. True
    where it cannot compile is a UserError."""
    if choice not in ("auto", True, False):
        raise UserError(f"compile must be auto, true or false, got {choice!r}")
    able = can_compile(device)
    if choice is True and not able:
        raise UserError("compile=true needs what torch.compile builds kernels with: a C++ "
                        "compiler ($CXX or g++) on the CPU, Triton on CUDA; install it or set "
                        "compile=false")
    if choice != "auto":
        return bool(choice), "asked for"
    if not able:
        return False, "no C++ compiler for torch.compile"
    if world > 1:
        return False, "several processes"
    if precision == "fp64":
        return False, "fp64"
    if widest > NARROW_CHANNELS:
        return False, f"a wide network ({widest} channels: its convolutions dominate the step)"
    est_seconds = run_seconds()
    if est_seconds == float("inf"):
        return False, "the device's peak is unknown, so the run's length is too"
    if est_seconds < PAYS_AFTER_S:
        return False, f"a short run (about {est_seconds:.0f} s eager; compiling pays after " \
                      f"{PAYS_AFTER_S:.0f} s)"
    return True, f"a long run (about {est_seconds:.0f} s eager)"


def forward_flop(model: torch.nn.Module, in_chans: int, image_size: int) -> int:
    """FLOP of one forward pass of one image (a multiply-add is two), counted by
    torch.utils.flop_counter on a forward pass in eval mode (BN statistics untouched)."""
    from torch.utils.flop_counter import FlopCounterMode
    p = next(model.parameters())
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, image_size, image_size, device=p.device,
                              dtype=p.dtype))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return counter.get_total_flops()

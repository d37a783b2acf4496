"""The fused BN kernels of training (fused_bn.cpp, run by resnetkit.fused): built for this
CPU and loaded, and the trainer's choice of them."""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ..errors import UserError
from . import cpu_flags
from .native import load_native

SOURCE = Path(__file__).resolve().parent.parent / "fused_bn.cpp"


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """fused_bn.cpp built for this CPU's instruction sets (load_native: one build per CPU
    feature set, so a cache shared by machines never runs code a CPU lacks) and its functions
    typed. Raises UserError when it cannot be built or loaded."""
    flags = cpu_flags()
    # -march=native, less AVX-512 where ONEDNN_MAX_CPU_ISA hides it (a capped run then
    # measures the kernels an AVX2-only CPU would run, as it does oneDNN's)
    build = ["-O2", "-march=native", "-fopenmp"] + ([] if "avx512f" in flags else ["-mno-avx512f"])
    try:
        so = load_native(SOURCE, build, key=",".join(sorted(flags)))
    except OSError as e:
        raise UserError(f"the fused BN kernels could not be built or loaded: {e}") from None
    return typed(so)


def typed(so: ctypes.CDLL) -> ctypes.CDLL:
    """`so` (a build of fused_bn.cpp) with its functions' argument and result types set."""
    p, i, f, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64
    so.rk_bn_act_forward.restype = so.rk_bn_act_backward.restype = i
    so.rk_bn_act_forward.argtypes = [i, p, p, p, i64, i, p, p, f, i, i, p, p, p]
    so.rk_bn_act_backward.argtypes = [i, p, p, p, p, p, i64, i, p, p, p, i, i, p, p]
    so.rk_maxpool2_forward.restype = so.rk_maxpool2_backward.restype = i
    so.rk_maxpool2_forward.argtypes = [i, p, p, i64, i, i, i, i]
    so.rk_maxpool2_backward.argtypes = [i, p, p, p, i64, i, i, i, i]
    so.rk_bn_act_pool_forward.restype = so.rk_bn_act_pool_backward.restype = i
    so.rk_bn_act_pool_forward.argtypes = [i, p, p, p, i64, i, i, i, p, p, f, i, p, p, p]
    so.rk_bn_act_pool_backward.argtypes = [i, p, p, p, p, p, i64, i, i, i, p, p, p, p, i, p, p]
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

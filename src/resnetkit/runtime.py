"""The one place that knows the hardware: the CPU's instruction sets, the precision and
memory-format decisions, peak FLOP/s, peak memory, and the C allocator setting.

The allocator: glibc's malloc serves a large block (above its mmap threshold, 128 KiB at start) with a
fresh mmap and gives it back with munmap when freed, and it trims the top of its heap
above 128 KiB. A network's activations are such blocks, allocated and freed at every
layer of every batch, so each new batch touches fresh pages and the kernel zero-fills
them: up to hundreds of thousands of page faults per batch, depending on the heap's
history (measured in fresh processes on ResNet-50 at batch 16, 224x224: 310,000-380,000 per
fp32 forward pass, 29,000-37,000 per eager bf16 channels_last pass), work that a dedicated
engine, which plans its buffers once, never does. Raising both thresholds keeps
freed blocks in the heap for the next batch. PyTorch's CPU tuning guides reach the same
end by preloading jemalloc or tcmalloc; this needs no extra library.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import UserError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for this setting on 64-bit systems
TRIM_THRESHOLD = 1 << 30
ENV = "RESNETKIT_ALLOCATOR"

_state: dict[str, Any] | None = None


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # glibc (and compatible) only
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        return libc
    except (OSError, AttributeError):
        return None


def tune_allocator() -> dict[str, Any]:
    """Keep freed blocks of up to 32 MiB in the heap and hold up to 1 GiB of free heap
    instead of returning it to the kernel. Idempotent; a no-op (reported) where the C
    library is not glibc or where the environment says RESNETKIT_ALLOCATOR=system.
    Returns what was done: {"allocator": "glibc-tuned"|"system", ...}."""
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get(ENV, "tuned").strip().lower()
    if choice not in ("tuned", "system"):
        raise UserError(f"{ENV} must be tuned or system, got {choice!r}")
    libc = _libc() if choice == "tuned" else None
    if libc is None:
        _state = {"allocator": "system",
                  "why": f"{ENV}=system" if choice == "system" else "C library is not glibc"}
        return _state
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and \
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _state = {"allocator": "glibc-tuned" if ok else "system",
              "glibc": libc.gnu_get_libc_version().decode(),
              "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    if not ok:
        _state["why"] = "mallopt refused the thresholds"
    return _state


def allocator_state() -> dict[str, Any]:
    """What tune_allocator() did in this process, or {"allocator": "system"} before it."""
    return dict(_state) if _state is not None else {"allocator": "system"}


# ---- the hardware -------------------------------------------------------------------------

# oneDNN's ISA levels (ONEDNN_MAX_CPU_ISA) in rising order, with the CPU flags that need at
# least that level: a cap below a level hides its flags, so every decision here follows what
# oneDNN will really run.
_ISA_LEVELS = (("AVX512_CORE", ("avx512f",)), ("AVX512_CORE_BF16", ("avx512_bf16",)),
               ("AVX512_CORE_AMX", ("amx_bf16", "amx_tile", "amx_int8")))
_ISA_ORDER = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
              "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16",
              "AVX512_CORE_AMX", "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16",
              "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")

# Dense peaks from the vendors' data sheets, TFLOP/s: (fp32 without tensor cores, tf32, bf16);
# the first name that is part of the device's name wins.
GPU_PEAKS = (("H100 PCIe", (51.0, 378.0, 756.0)), ("H100", (67.0, 494.7, 989.4)),
             ("H200", (67.0, 494.7, 989.4)), ("A100", (19.5, 156.0, 312.0)),
             ("L4", (30.3, 60.0, 121.0)))


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """{"name", "mhz", "flags"} of the first CPU in /proc/cpuinfo (flags empty, name "cpu"
    where unreadable). The flags are those oneDNN may use: ONEDNN_MAX_CPU_ISA, where set,
    hides the instructions above its cap (AVX-512, AVX512-BF16, AMX)."""
    name, mhz, flags = "cpu", 0.0, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name == "cpu":
                name = value.strip()
            elif key == "cpu MHz" and not mhz:
                mhz = float(value)
            elif key == "flags" and not flags:
                flags = set(value.split())
    except (OSError, ValueError):
        pass
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap in _ISA_ORDER:
        level = _ISA_ORDER.index(cap)
        for isa, hidden in _ISA_LEVELS:
            if level < _ISA_ORDER.index(isa):
                flags -= {f for f in flags if f.startswith(hidden)}
    return {"name": name, "mhz": mhz, "flags": flags}


def cpu_flags() -> set[str]:
    """The instruction-set flags oneDNN may use on this CPU (see cpu_info)."""
    return set(cpu_info()["flags"])


def has_native_bf16(device: torch.device | str = "cpu") -> bool:
    """x86 CPUs with AVX512-BF16 or AMX-BF16 instructions; any bf16-capable CUDA device."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def decide_precision(precision: str, device: torch.device | str,
                     choices: tuple[str, ...] = ("bf16", "fp16", "fp32", "fp64")) -> str:
    """Resolve "auto": bf16 where the device runs it natively, fp16 on other CUDA devices,
    fp32 elsewhere (for inference, which has no fp16 path, fp32 on those devices too).
    Raises UserError for a precision outside `choices` or fp16 off CUDA."""
    device = torch.device(device)
    if precision == "auto":
        precision = "bf16" if has_native_bf16(device) else \
            ("fp16" if device.type == "cuda" and "fp16" in choices else "fp32")
    if precision not in choices:
        raise UserError(f"precision must be auto or one of {', '.join(choices)}, "
                        f"got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def decide_channels_last(choice: Literal["auto"] | bool, precision: str,
                         device: torch.device | str, training: bool = True) -> bool:
    """Resolve channels_last "auto" for a precision on a device: on with bf16/fp16 and on
    CUDA; for training on the CPU in fp32 too, except on AMX CPUs.

    Measured (training step, ResNet-20, batch 256, 1x28x28, torch 2.13, interleaved rounds):
    fp32 channels_last against NCHW, 557 vs 453 img/s on an AVX2-only AMD EPYC (1.23x), 609 vs
    497 on an AVX512-BF16 AMD EPYC (1.23x), 449 vs 349 on the same with oneDNN capped at AVX2
    (1.28x); on an AMX Sapphire Rapids, 406 vs 631 (0.64x). bf16 on the CPU is fast only in
    channels_last (1,596 vs 111 img/s on the AMX machine). Inference in fp32 keeps NCHW (see
    infer.optimize)."""
    if choice != "auto":
        return bool(choice)
    device = torch.device(device)
    if precision in ("bf16", "fp16") or device.type == "cuda":
        return True
    return training and precision == "fp32" and "amx_bf16" not in cpu_flags()


def hardware(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Device name, threads and peak FLOP/s (fp32 and bf16) where they can be derived."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = next((v for k, v in GPU_PEAKS if k in name), None)
        # PyTorch runs fp32 convolutions on TF32 tensor cores unless told not to
        tf32 = torch.backends.cudnn.allow_tf32
        return {"device": name, "threads": threads, "fp32_convs": "tf32" if tf32 else "fp32",
                "peak_fp32_gflops": peaks[1 if tf32 else 0] * 1e3 if peaks else None,
                "peak_bf16_gflops": peaks[2] * 1e3 if peaks else None}
    info = cpu_info()
    flags = info["flags"]
    # FLOP per cycle per core: AVX-512 = 2 FMA units x 16 fp32 lanes x 2; AMX-BF16 tiles
    # = 1024 bf16 FLOP; AVX512-BF16 dot products = 2 x 32 x 2; AVX2 = 2 x 8 x 2.
    fp32 = 64 if "avx512f" in flags else 32
    bf16 = 1024 if "amx_bf16" in flags else (128 if "avx512_bf16" in flags else fp32)
    ghz = info["mhz"] / 1000
    return {"device": info["name"], "threads": threads, "ghz": ghz,
            "avx512": "avx512f" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "peak_fp32_gflops": threads * fp32 * ghz, "peak_bf16_gflops": threads * bf16 * ghz}


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux reports KiB

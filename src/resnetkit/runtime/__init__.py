"""The one place that knows the hardware: the CPU's instruction sets, the precision and
memory-format decisions (and the autocast that carries them out), peak FLOP/s and peak
memory here; the C allocator setting in allocator.py, available memory and the memory a
network needs in memory.py.
"""
from __future__ import annotations

import ctypes
import functools
import os
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import UserError
from .allocator import allocator_state, tune_allocator
from .memory import available_memory, check_memory, memory_estimate

__all__ = ["allocator_state", "autocast", "available_memory", "check_memory", "cpu_flags",
           "cpu_info", "decide_channels_last", "decide_precision", "gemm_gflops", "hardware",
           "has_native_bf16", "last_level_cache_bytes", "max_clock", "memory_estimate",
           "multiply_add_peaks", "peak_memory_mb", "tune_allocator"]

# ---- the hardware -------------------------------------------------------------------------

# oneDNN's ISA levels (ONEDNN_MAX_CPU_ISA) in rising order, with the CPU flags that need at
# least that level: a cap below a level hides its flags, so every decision here follows what
# oneDNN will really run.
_ISA_LEVELS = (("AVX2_VNNI", ("avx_vnni",)), ("AVX512_CORE", ("avx512",)),
               ("AVX512_CORE_VNNI", ("avx512_vnni",)), ("AVX512_CORE_BF16", ("avx512_bf16",)),
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
    """{"name", "mhz", "flags", "vendor", "family"} of the first CPU in /proc/cpuinfo (flags empty, name "cpu"
    where unreadable). The flags are those oneDNN may use: ONEDNN_MAX_CPU_ISA, where set,
    hides the instructions above its cap (AVX-512, AVX512-BF16, AMX)."""
    name, mhz, flags, vendor, family = "cpu", 0.0, set(), "", 0
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
            elif key == "vendor_id" and not vendor:
                vendor = value.strip()
            elif key == "cpu family" and not family:
                family = int(value)
    except (OSError, ValueError):
        pass
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if cap in _ISA_ORDER:
        level = _ISA_ORDER.index(cap)
        for isa, hidden in _ISA_LEVELS:
            if level < _ISA_ORDER.index(isa):
                flags -= {f for f in flags if f.startswith(hidden)}
    return {"name": name, "mhz": mhz, "flags": flags, "vendor": vendor, "family": family}


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


def _flop_per_cycle(info: dict[str, Any]) -> dict[str, int]:
    """Per core and cycle: fp32 FLOP, bf16 FLOP and int8 operations (a multiply-add is two).
    AVX-512 = 2 FMA units x 16 fp32 lanes x 2; AMD's Zen 4 (family 25 with AVX-512) runs
    512-bit instructions in two halves on 256-bit units, so half that; AVX2 = 2 x 8 x 2.
    AVX512-BF16 dot products double the fp32 rate; AMX tiles give 1024 bf16 FLOP and 2048
    int8 operations. VNNI's int8 dot products (vpdpbusd: 4 multiply-adds per 32-bit lane)
    give four times the fp32 rate; without VNNI, int8 takes a multiply-add pair per step,
    about twice the fp32 rate."""
    flags = info["flags"]
    wide = "avx512f" in flags and not (info.get("vendor") == "AuthenticAMD"
                                       and info.get("family") == 25)
    fp32 = 64 if wide else 32
    bf16 = 1024 if "amx_bf16" in flags else (2 * fp32 if "avx512_bf16" in flags else fp32)
    vnni = {"avx512_vnni", "avx_vnni"} & flags
    int8 = 2048 if "amx_int8" in flags else (4 if vnni else 2) * fp32
    return {"fp32": fp32, "bf16": bf16, "int8": int8}


CPUFREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq")


def max_clock() -> tuple[float, str]:
    """(GHz, source) of the cores' highest clock as the OS reports it (cpufreq's
    cpuinfo_max_freq), or (0, "") where it does not (virtual machines often hide cpufreq)."""
    root = CPUFREQ
    for name in ("cpuinfo_max_freq", "scaling_max_freq"):
        try:
            khz = int((root / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if khz > 0:
            return khz / 1e6, f"cpufreq {name}"
    return 0.0, ""


CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int:
    """The size of the first core's largest data or unified cache (usually L3, shared by the
    cores), as the kernel reports it; 0 where it does not."""
    best = 0
    for d in sorted(CPU_CACHES.glob("index*")):
        try:
            if (d / "type").read_text().strip() == "Instruction":
                continue
            size = (d / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
            best = max(best, int(size.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return best


@functools.lru_cache(maxsize=4)
def gemm_gflops(threads: int, n: int = 1536, reps: int = 6) -> float:
    """The best fp32 GFLOP/s of an n x n matrix product (oneDNN/MKL's GEMM, `threads`
    threads): a lower bound of the true peak, as no kernel beats the clock."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(old)
    return 2 * n ** 3 / best / 1e9


PEAK_SOURCE = Path(__file__).parent.parent / "peak.c"
# the instruction sets peak.c may use, by CPU flag (compiled in only where the flag is set,
# and cpu_info's flags already follow ONEDNN_MAX_CPU_ISA)
_PEAK_ISA = (("avx2", "-mavx2"), ("fma", "-mfma"), ("avx512f", "-mavx512f"),
             ("avx512_bf16", "-mavx512bf16"), ("avx512_vnni", "-mavx512vnni"),
             ("avx_vnni", "-mavxvnni"))


def _peak_kernels() -> Any:
    """peak.c built for the instruction sets this CPU offers oneDNN, loaded with ctypes; None
    where there is no C compiler or the build fails (the caller then falls back to a GEMM)."""
    import shutil
    import subprocess
    import tempfile
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc or not PEAK_SOURCE.is_file():
        return None
    flags = cpu_flags()
    isa = [opt for flag, opt in _PEAK_ISA if flag in flags]
    base = [opt for opt in isa if opt in ("-mavx2", "-mfma", "-mavx512f")]
    kernels = None
    with tempfile.TemporaryDirectory(prefix="resnetkit-peak-") as tmp:
        lib = Path(tmp) / "peak.so"
        # an older compiler may not know a newer instruction set's flag: then without the
        # dot products (their rates come from the table's ratios)
        for opts in (isa, base) if base != isa else (isa,):
            try:
                subprocess.run([cc, "-O2", "-shared", "-fPIC", *opts, str(PEAK_SOURCE), "-o",
                                str(lib)], check=True, capture_output=True, timeout=60)
                kernels = ctypes.CDLL(str(lib))  # stays mapped after the file is removed
                break
            except (OSError, subprocess.SubprocessError):
                continue
    if kernels is None:
        return None
    for name, seed in (("fp32_fma", ctypes.c_float), ("bf16_dot", ctypes.c_float),
                       ("int8_dot", ctypes.c_int)):
        fn = getattr(kernels, name)
        fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_long, seed]
    return kernels


@functools.lru_cache(maxsize=4)
def multiply_add_peaks(threads: int, seconds: float = 0.05, reps: int = 5) -> dict[str, float]:
    """{"fp32", "bf16", "int8"}: GFLOP/s (int8: G operations/s) of `threads` cores each
    running peak.c's multiply-add chains at once (ctypes releases the GIL), best of `reps`
    rounds of about `seconds`. fp32 is the widest FMA; bf16 AVX512-BF16's dot product; int8
    VNNI's. A precision whose instruction this CPU lacks (or AMX, which peak.c does not
    drive) is absent; everything is absent where no C compiler is found."""
    import threading
    kernels = _peak_kernels()
    if kernels is None:
        return {}
    out: dict[str, float] = {}
    for precision, name, seed in (("fp32", "fp32_fma", 1.0), ("bf16", "bf16_dot", 1.0),
                                  ("int8", "int8_dot", 3)):
        fn = getattr(kernels, name)
        t = time.perf_counter()
        ops = fn(100_000, seed)
        if not ops:
            continue
        iters = max(100_000, int(100_000 * seconds / max(time.perf_counter() - t, 1e-6)))
        best = 0.0
        for _ in range(reps):
            done = [0.0] * threads
            workers = [threading.Thread(target=lambda i: done.__setitem__(i, fn(iters, seed)),
                                        args=(i,)) for i in range(threads)]
            t = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = max(best, sum(done) / (time.perf_counter() - t) / 1e9)
        out[precision] = best
    return out


def hardware(device: torch.device | str = "cpu", measure: bool = False) -> dict[str, Any]:
    """Device name, threads and peak FLOP/s (fp32, bf16; int8 operations on the CPU) where
    they can be derived. On the CPU the peak is threads x FLOP per cycle (_flop_per_cycle) x
    the highest clock where the OS reports it (cpufreq's maximum). Else, with measure=True,
    it is measured: every core runs chains of the widest multiply-add instruction at once
    (peak.c: the FMA for fp32, AVX512-BF16's and VNNI's dot products for bf16 and int8), so
    no kernel can beat it; /proc/cpuinfo's clock (often the base clock, which boosting cores
    beat) or a large GEMM count only where they give more. Without measure, /proc/cpuinfo's
    clock. "peak_source" says which; "ghz" is the clock the fp32 peak implies."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = next((v for k, v in GPU_PEAKS if k in name), None)
        # PyTorch runs fp32 convolutions on TF32 tensor cores unless told not to
        tf32 = torch.backends.cudnn.allow_tf32
        return {"device": name, "threads": threads, "fp32_convs": "tf32" if tf32 else "fp32",
                "peak_fp32_gflops": peaks[1 if tf32 else 0] * 1e3 if peaks else None,
                "peak_bf16_gflops": peaks[2] * 1e3 if peaks else None,
                "peak_source": "data sheet" if peaks else None}
    info = cpu_info()
    flags = info["flags"]
    per_cycle = _flop_per_cycle(info)
    ghz, source = max_clock()
    out: dict[str, Any] = {}
    if not ghz:
        ghz, source = info["mhz"] / 1000, "/proc/cpuinfo clock"
    peaks = {p: threads * n * ghz for p, n in per_cycle.items()}
    if source == "/proc/cpuinfo clock" and measure:
        measured = multiply_add_peaks(threads)
        gemm = gemm_gflops(threads)
        out = {"measured_multiply_add": measured, "gemm_fp32_gflops": gemm}
        # each precision: the largest of the stated clock's figure, the measured
        # instruction rate and, where that instruction is absent, the measured fp32
        # rate times the table's ratio (AMX, or a build without a compiler: the GEMM)
        fp32 = max(measured.get("fp32", 0.0), gemm)
        if fp32 > peaks["fp32"]:
            source = ("measured multiply-add throughput (peak.c, all cores)"
                      if measured.get("fp32", 0.0) >= gemm
                      else "measured fp32 GEMM (clock it implies)")
            ghz = fp32 / (threads * per_cycle["fp32"])
        by: dict[str, str] = {}
        for p in peaks:
            options = {"stated clock x FLOP per cycle": peaks[p],
                       "measured instruction rate": measured.get(p, 0.0),
                       "measured fp32 rate x the table's ratio":
                           fp32 * per_cycle[p] / per_cycle["fp32"]}
            by[p] = max(options, key=options.get)
            peaks[p] = options[by[p]]
        out["gemm_implied_ghz"] = gemm / (threads * per_cycle["fp32"])
        out["peak_source_by_precision"] = by
    return {"device": info["name"], "threads": threads, "ghz": ghz, "peak_source": source,
            "flop_per_cycle": per_cycle, **out,
            "avx512": "avx512f" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags),
            "peak_fp32_gflops": peaks["fp32"], "peak_bf16_gflops": peaks["bf16"],
            "peak_int8_gops": peaks["int8"]}


def peak_memory_mb(device: torch.device | str = "cpu") -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux reports KiB


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast on the device, or nothing for fp32/fp64."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()

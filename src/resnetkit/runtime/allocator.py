"""The C allocator setting. glibc's malloc serves a large block (above its mmap threshold, 128 KiB at start) with a
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
import os
from typing import Any

from ..errors import UserError

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

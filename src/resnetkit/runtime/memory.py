"""Memory: what this process may still allocate, what a network needs (estimated on the meta
device), and the one-sentence refusal when it does not fit."""
from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError


def available_memory() -> int:
    """Bytes this process may still allocate: the least of the system's MemAvailable, the
    cgroup's limit less its usage, and the address-space limit (ulimit -v) less what the
    process maps already."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            limits.append(int(cap) - used)
    except (OSError, ValueError):
        pass
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        mapped = 0
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmSize:"):
                    mapped = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        limits.append(soft - mapped)
    return max(0, min(limits)) if limits else 1 << 62


def memory_estimate(cfg: Any, image_size: int | tuple[int, int] = 0, batch: int = 1,
                    training: bool = False) -> dict[str, int]:
    """Bytes a network of config `cfg` needs, estimated on the meta device (nothing is
    allocated): its fp32 parameters and buffers (times 4 when training: gradients, momentum
    and an EMA copy), and with image_size its activations for `batch` images (training:
    every layer's output, which autograd keeps; inference: the two largest outputs, the
    input and output of the widest layer)."""
    from ..model import ResNet
    with torch.device("meta"):
        net = ResNet(cfg)
    weights = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    out = {"weights": weights * (4 if training else 1), "activations": 0}
    if image_size:
        sizes: list[int] = []
        in_place = (torch.nn.ReLU, torch.nn.Identity, torch.nn.Dropout)  # no memory of their own
        hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * 4))
                 for m in net.modules() if not list(m.children()) and not isinstance(m, in_place)]
        with torch.no_grad():
            hw = (image_size,) * 2 if isinstance(image_size, int) else tuple(image_size)
            net(torch.empty(batch, cfg.in_chans, *hw, device="meta"))
        for h in hooks:
            h.remove()
        out["activations"] = sum(sizes) if training else sum(sorted(sizes)[-2:])
    out["total"] = out["weights"] + out["activations"]
    return out


def check_memory(cfg: Any, image_size: int | tuple[int, int] = 0, batch: int = 1,
                 training: bool = False, what: str = "the network") -> None:
    """UserError, before anything is allocated, when `memory_estimate` is over what this
    process may allocate (available_memory): a network too wide or deep, an input too large
    or a batch too big for this machine ends in one sentence, not in the kernel's OOM kill."""
    need, have = memory_estimate(cfg, image_size, batch, training), available_memory()
    if need["total"] > 0.9 * have:  # a tenth left to the process itself and the system
        copies = (" with their copies (gradients and optimizer state, or an exporter's)"
                  if training else "")
        hw = (image_size,) * 2 if isinstance(image_size, int) else tuple(image_size)
        size = f" at {hw[0]}x{hw[1]}, batch {batch}" if image_size else ""
        raise UserError(f"{what}{size} needs about {need['total'] / 2**30:.1f} GiB "
                        f"({need['weights'] / 2**30:.1f} GiB of weights"
                        f"{copies}, "
                        f"{need['activations'] / 2**30:.1f} GiB of activations) and this "
                        f"machine has {have / 2**30:.1f} GiB available: choose a smaller "
                        f"network, input or batch")

"""What the trainer needs to run under torchrun (DDP): the process group, batch sizes,
the data shard of each rank, SyncBatchNorm on any device, and reductions of metrics.

resnetkit adds no communication of its own beyond torch.distributed's collectives: DDP
averages the gradients; `all_reduce` sums the metrics. The one exception is batch norm on the
CPU, where torch.nn.SyncBatchNorm refuses CPU tensors; `CpuSyncBatchNorm` is the same
computation written with one all_reduce of the per-channel sums (and one in backward).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job; world 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """True inside a torchrun (or other env:// launcher) worker of a job of 2+ processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device | None, timeout_s: float) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on
    the CPU), bind this rank's GPU (LOCAL_RANK) and return its DistInfo and device. A
    collective that waits longer than `timeout_s` raises instead of hanging."""
    if not launched():
        return DistInfo(), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = torch.device(device) if device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this machine has "
                            f"{torch.cuda.device_count()}; start at most that many processes per node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                store=_attempt_store(rank, world, timeout_s), rank=rank,
                                world_size=world,
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistInfo(rank, world, local_rank, local_world, backend), dev


def _attempt_store(rank: int, world: int, timeout_s: float) -> dist.Store:
    """The rendezvous store torchrun describes (MASTER_ADDR/PORT; its agent's store when
    TORCHELASTIC_USE_AGENT_STORE), under a prefix of its own for each restart of the group.
    The agent keeps one store across restarts, so without the prefix a restarted group could
    read the previous attempt's addresses and wait on peers that are gone (seen: a restarted
    gloo group stalled in connectFullMesh until the timeout)."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent and rank == 0, timeout=timedelta(seconds=timeout_s),
                          multi_tenant=not agent)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"resnetkit/attempt_{attempt}", store)


def default_threads(info: DistInfo) -> int:
    """Each rank's share of this machine's cores (torchrun itself sets OMP_NUM_THREADS=1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // info.local_world)


@dataclass(frozen=True)
class Batches:
    """Batch sizes of a run: `per_rank` samples per forward pass, `accum` forward passes per
    optimizer step on each rank, `global_` = per_rank x accum x world samples per step, and
    `lr`, the learning rate after scaling for the global batch."""

    per_rank: int
    accum: int
    global_: int
    lr: float
    lr_batch: int


def resolve_batches(batch_size: int, global_batch: int, accum: int, world: int, lr: float,
                    lr_batch: int, lr_scale: str) -> Batches:
    """The rule: with `global_batch` set, each rank's batch is global_batch / (world x accum)
    (it must divide evenly); otherwise batch_size is the per-rank batch. The learning rate
    given is meant for a global batch of `lr_batch` samples (0: batch_size, the batch the
    recipe was written for) and is scaled to the real global batch G: linearly, lr x G /
    lr_batch (Goyal et al., 2017), by the square root of that ratio, or not at all."""
    ref = lr_batch or batch_size
    if global_batch:
        if global_batch % (world * accum):
            raise UserError(f"global batch {global_batch} cannot be split evenly over {world} "
                            f"process(es) x {accum} accumulation step(s); choose a multiple of "
                            f"{world * accum}")
        per_rank = global_batch // (world * accum)
    else:
        per_rank = batch_size
    g = per_rank * accum * world
    ratio = g / ref
    scaled = {"linear": lr * ratio, "sqrt": lr * math.sqrt(ratio), "none": lr}[lr_scale]
    return Batches(per_rank, accum, g, scaled, ref)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the n training samples in an epoch: the same on every rank, a function
    of seed and epoch only (so a resumed run, of any world size, continues it)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def step_indices(perm: torch.Tensor, step: int, b: Batches, info: DistInfo,
                 drop_last: bool) -> list[torch.Tensor]:
    """The micro-batches (one per accumulation step) that rank `info.rank` trains on at
    optimizer step `step` of an epoch whose order is `perm` (the same on every rank).

    Step s uses perm[s*G:(s+1)*G]; rank r takes the r-th contiguous share of it and splits
    that into `accum` micro-batches, so the ranks never overlap and together see exactly
    what one process with batch G would. The samples left over after the last full global
    batch (N mod G) are skipped with drop_last (they fall elsewhere in the next epoch's
    order); otherwise they form one last, smaller step split as evenly as possible over
    ranks and micro-batches, provided each micro-batch gets at least one sample."""
    n_full = len(perm) // b.global_
    if step < n_full:
        chunk = perm[step * b.global_:(step + 1) * b.global_]
    elif step == n_full and not drop_last:
        chunk = perm[n_full * b.global_:]
    else:
        raise IndexError(f"epoch has no step {step}")
    mine = torch.tensor_split(chunk, info.world)[info.rank]
    return list(torch.tensor_split(mine, b.accum))


def steps_per_epoch(n: int, b: Batches, world: int, drop_last: bool) -> int:
    full, rest = divmod(n, b.global_)
    return full + (1 if not drop_last and rest >= world * b.accum else 0)


def all_sum(*values: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Sums of the given tensors over all ranks (one collective); unchanged on one process."""
    if not info.active:
        return list(values)
    # NCCL reduces only CUDA tensors; gloo takes either.
    dev = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else None
    flat = torch.cat([v.detach().to(dev or v.device, torch.float64).reshape(-1) for v in values])
    dist.all_reduce(flat)
    out, i = [], 0
    for v in values:
        out.append(flat[i:i + v.numel()].reshape(v.shape).to(v.device, v.dtype))
        i += v.numel()
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of a picklable object, on every rank."""
    if not info.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(modules, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BN running statistics). DDP broadcasts them before
    each forward, but the last forward of an epoch leaves each rank with its own; evaluation
    and checkpoints must use one set."""
    if info.active:
        for m in modules:
            for b in m.buffers():
                dist.broadcast(b, src=0)


def barrier(info: DistInfo) -> None:
    """Wait until every rank is here; nothing on one process."""
    if info.active:
        dist.barrier()


def explain_failure(e: RuntimeError, info: DistInfo, timeout_s: float) -> UserError | None:
    """The one sentence for a collective that failed in a job of several processes: it
    waited past `timeout_s`, or lost its peer; None for any other error (a bug of ours, to be
    raised as it is). torch.distributed says which only in its messages' text."""
    text = str(e).lower()
    if not info.active:
        return None
    if any(w in text for w in ("timed out", "timeout")):
        return UserError(
            f"rank {info.rank}: a collective operation waited more than {timeout_s:g} s "
            f"(dist_timeout) for the other processes; one of them has failed or hung, see its "
            f"output. ({str(e).splitlines()[0]})")
    if any(w in text for w in ("connection closed", "connection reset", "broken pipe", "peer")):
        return UserError(
            f"rank {info.rank}: lost contact with another process of the job (it died or its "
            f"machine went away); under torchrun --max-restarts the group restarts from the "
            f"last checkpoint")
    return None


class _AllSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of the ranks' gradients (each rank's loss
    depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        dist.all_reduce(g)
        return g


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the whole global batch: each rank
    sums x and x^2 per channel, one all_reduce adds them over ranks, and the
    gradient flows back through that sum to every rank's inputs (as torch.nn.SyncBatchNorm
    does on GPUs). In eval mode, or on one process, it is plain batch norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        x32 = x if x.dtype == torch.float64 else x.float()
        count = torch.full((1,), x32.numel() / c, dtype=torch.float64, device=x.device)
        stats = torch.cat([x32.sum((0, 2, 3)).double(), (x32 * x32).sum((0, 2, 3)).double(), count])
        stats = _AllSum.apply(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked + 1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1).clamp(min=1)).to(self.running_var.dtype), m)
                self.num_batches_tracked += 1
        scale = torch.rsqrt(var + self.eps).to(x32.dtype)
        shift = -mean.to(x32.dtype) * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        y = x32 * scale[None, :, None, None] + shift[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d synchronised over the world: torch's SyncBatchNorm on CUDA,
    CpuSyncBatchNorm elsewhere. Weights and running statistics are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def swap(m: nn.Module) -> nn.Module:
        if isinstance(m, nn.BatchNorm2d) and not isinstance(m, CpuSyncBatchNorm):
            s = CpuSyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            s.load_state_dict(m.state_dict())
            s.to(m.weight.device if m.affine else m.running_mean.device)
            s.train(m.training)
            return s
        for name, child in m.named_children():
            setattr(m, name, swap(child))
        return m
    return swap(model)


def torchrun(nproc: int, argv: list[str]) -> int:
    """`resnetkit train --nproc N ...` = torchrun --standalone --nproc-per-node N on this
    machine, with the same arguments minus --nproc; returns torchrun's exit status."""
    import subprocess
    import sys
    rest, skip = [], False
    for t in argv:
        if skip:
            skip = False
        elif t == "--nproc":
            skip = True
        elif not t.startswith("--nproc="):
            rest.append(t)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "resnetkit", *rest]
    print("launching: torchrun " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    return subprocess.call(cmd)

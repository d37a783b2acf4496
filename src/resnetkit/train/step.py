"""One optimizer step: forward and backward of each micro-batch under the run's precision
(compiled where that pays), gradient clipping, the optimizer, the schedule and the EMA.

The trainer runs its epochs through it and `bench` times it, so bench's training figure is
what `train` gets."""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from ..fused import fused_norm_act
from ..runtime.fused_kernels import library as fused_library
from ..runtime import autocast
from ..runtime.compiling import own_code


class TrainStep:
    """`step(micro, step_samples)` runs one optimizer step over micro-batches [(x, y), ...].

    `model` is the module whose parameters learn, `net` what runs the forward pass (the same
    module, or its DistributedDataParallel wrapper). With `compile`, the forward pass and the
    loss are compiled by torch.compile (TorchInductor), which also compiles their backward
    pass: BN, ReLU and the residual additions run as fused loops instead of one pass over
    memory each. The first call compiles; `compile_s` holds the seconds it took. With `fused`
    (not with `compile`), the blocks run those by resnetkit's own fused kernels (fused.py)
    instead."""

    def __init__(self, model: torch.nn.Module, net: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device,
                 precision: str, *, world: int = 1, label_smoothing: float = 0.0,
                 grad_clip: float = 0.0, ema: Any = None, scaler: Any = None,
                 compile: bool = False, fused: bool = False):
        if compile and fused:
            raise ValueError("a compiled step fuses BN and ReLU itself: fused=True is for eager")
        self.model, self.net, self.optimizer, self.scheduler = model, net, optimizer, scheduler
        self.device, self.precision, self.world = device, precision, world
        self.label_smoothing, self.grad_clip = label_smoothing, grad_clip
        self.ema, self.scaler, self.compiled, self.fused = ema, scaler, compile, fused
        self._fused_lib = fused_library() if fused else None
        self.compile_s = 0.0
        self._first = compile
        # dynamic=False: one graph per input shape (an uneven last batch compiles once more)
        # its own code object: torch.compile's cache (and limit of 8 graphs) is per code object
        self._loss = (torch.compile(own_code(self._forward), dynamic=False) if compile
                      else self._forward)

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.precision), fused_norm_act(self._fused_lib):
            out = self.net(x)
            logits = out if out.dtype == torch.float64 else out.float()
            loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        return loss, out

    def __call__(self, micro: list[tuple[torch.Tensor, torch.Tensor]],
                 step_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's micro-batches (gradient accumulation; DDP
        averages over ranks at the last one). Each micro-batch's mean loss is weighted by its
        share of the `step_samples` of the whole step, so the gradient is the mean over the
        global batch even when the last step of an epoch is uneven. Returns this rank's
        (loss sum, number correct) as tensors, without a device sync."""
        t0 = time.perf_counter() if self._first else 0.0
        n_step = step_samples or sum(len(y) for _, y in micro) * self.world
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            sync = nullcontext() if last or self.net is self.model else self.net.no_sync()
            with sync:
                loss, out = self._loss(x, y)
                weighted = loss * (len(y) * self.world / n_step)
                (self.scaler.scale(weighted) if self.scaler else weighted).backward()
            loss_sum += loss.detach() * len(y)
            correct += (out.detach().argmax(1) == y).sum()
        self._update()
        if self._first:
            self.compile_s, self._first = time.perf_counter() - t0, False
        return loss_sum, correct

    def _update(self) -> None:
        """Clip, step the optimizer (through the fp16 scaler if any), the schedule, the EMA."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)

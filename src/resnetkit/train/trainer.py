"""The trainer: one loop for CPU or GPU, mixed precision, checkpoints, exact resume."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from .. import weights as ckpt
from ..errors import UserError
from ..evaluate import evaluate
from ..runtime import decide_channels_last, decide_precision, hardware, peak_memory_mb
from ..runtime.compiling import decide_compile, estimated_train_s, forward_flop
from ..runtime.fused_kernels import decide_fused
from . import distributed as D
from .config import TrainConfig
from .feed import Feed, draw_seed
from .network import build_model, place
from .optim import build_ema, build_optimizer, lr_factor
from .progress import Progress
from .resume import StopSignals, own_sums, resume, training_state
from .runs import RunFolder, environment, new_run_dir
from .step import TrainStep


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Trainer:
    """Trains a ResNet on a dataset as TrainConfig says; `fit()` runs to the end.

    Everything needed to resume (weights, optimizer, schedule, EMA, RNG states, position) is
    checkpointed atomically after every epoch and on Ctrl-C; `Trainer.resume(run_dir)`
    continues so that the result equals an uninterrupted run (bitwise on the CPU in
    deterministic mode)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path | None = None,
                 device: str | torch.device | None = None, quiet: bool = False,
                 load_init: bool = True):
        """Load the data, build the model, optimizer and schedule for `cfg` on `device`
        (default: CUDA if present), in RUN_DIR (default: OUT_DIR/NAME). `load_init=False`
        skips cfg.init (a resumed run has its own weights). Raises UserError for a dataset,
        model or batch that cannot train."""
        # Under torchrun every rank builds the same Trainer; DDP keeps the replicas equal.
        self.dist, self.device = D.setup(device, cfg.dist_timeout)
        self.quiet = quiet or not self.dist.main
        threads = cfg.threads or (D.default_threads(self.dist) if self.dist.active else 0)
        if threads:
            torch.set_num_threads(threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)
        self.precision = decide_precision(cfg.precision, self.device)
        self.channels_last = decide_channels_last(cfg.channels_last, self.precision, self.device)
        self.feed = Feed(cfg)  # fixed from here on but for its normalisation (mean, std)
        self.train_data, self.test_data = self.feed.train, self.feed.test
        self.image_size = self.feed.image_size
        model = build_model(cfg, self.feed, load_init)
        # The resolved global batch and lr reference are written back into the config, so a
        # resumed run keeps them whatever its number of processes.
        self.batches = D.resolve_batches(cfg.batch_size, cfg.global_batch, cfg.accum_steps,
                                         self.dist.world, cfg.lr, cfg.lr_batch, cfg.lr_scale)
        # compile too: decided from the run's length, so a resumed (or extended) run keeps it
        self.compiled, self.compile_why = self._decide_compile(cfg, model)
        self.fused, self.fused_why = decide_fused(cfg.fused_bn, self.device, self.channels_last,
                                                  self.compiled)
        self.cfg = cfg = dataclasses.replace(cfg, global_batch=self.batches.global_,
                                             lr_batch=self.batches.lr_batch,
                                             compile=self.compiled, fused_bn=self.fused)
        self.dtype = torch.float64 if self.precision == "fp64" else torch.float32
        self.model, self.net = place(model, cfg.sync_bn, self.dist, self.device, self.dtype,
                                     self._fmt)
        self.steps_per_epoch = D.steps_per_epoch(len(self.train_data), self.batches,
                                                 self.dist.world, cfg.drop_last)
        if self.steps_per_epoch == 0:
            raise UserError(f"global batch {self.batches.global_} is larger than the "
                            f"{len(self.train_data)} training samples")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.optimizer = build_optimizer(self.model, cfg, lr=self.batches.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg, self.total_steps, self.steps_per_epoch))
        self.ema = build_ema(self.model, cfg.ema_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step = TrainStep(self.model, self.net, self.optimizer, self.scheduler, self.device,
                              self.precision, world=self.dist.world,
                              label_smoothing=cfg.label_smoothing, grad_clip=cfg.grad_clip,
                              ema=self.ema, scaler=self.scaler, compile=self.compiled,
                              fused=self.fused)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_acc, self.history = -1.0, []
        # the interrupted epoch's running sums: each rank's (loss, correct, seen), seconds
        self.epoch_partial: tuple[list, float] = ([], 0.0)
        self._sums, self._last_eval = None, (-1, None)
        self.signals = StopSignals()
        path = run_dir or new_run_dir(cfg.out_dir, cfg.name, cfg.model, cfg.dataset)
        self.folder = RunFolder(Path(D.broadcast_object(str(path), self.dist)))

    def _decide_compile(self, cfg: TrainConfig, model: torch.nn.Module) -> tuple[bool, str]:
        """Whether the training step is compiled (runtime.compiling.decide_compile), from
        the run's estimated eager length: its training FLOP at the device's usual rate."""
        def run_seconds() -> float:
            flop = 3 * forward_flop(model, self.feed.train.shape[0], self.image_size)
            return estimated_train_s(flop * len(self.train_data) * cfg.epochs, self.precision,
                                     hardware(self.device)["peak_fp32_gflops"])
        if cfg.compile == "auto" and cfg.fused_bn in ("auto", True) and \
                decide_fused("auto", self.device, self.channels_last, False)[0]:
            # measured side by side (bench, ResNet-20 at batch 256, bf16, Xeon with AMX): the
            # eager step with the fused kernels 2,081 img/s, the compiled step 1,997
            return False, "the fused BN kernels instead (faster than compiling, no wait)"
        return decide_compile(cfg.compile, self.device, self.precision, run_seconds,
                              self.dist.world, max(model.cfg.channels))

    @classmethod
    def resume(cls, run_dir: str | Path, device=None, quiet: bool = False,
               **changes: Any) -> "Trainer":
        """Rebuild a run from RUN_DIR/config.json and continue from last.state.pt.
        `changes` may only extend the run (epochs). Raises UserError for a folder that is
        not a run or a damaged state."""
        return resume(cls, run_dir, device=device, quiet=quiet, **changes)

    # ---- what others read ----------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        """The run's folder."""
        return self.folder.path

    @property
    def stop_signal(self) -> int | None:
        """The signal that stopped the last fit (SIGINT for Ctrl-C); None if none did."""
        return self.signals.signum

    @property
    def mean(self) -> tuple[float, ...]:
        """The normalisation's per-channel mean (the data's, or the initial weights')."""
        return self.feed.mean

    @property
    def std(self) -> tuple[float, ...]:
        """The normalisation's per-channel standard deviation."""
        return self.feed.std

    @property
    def eval_model(self) -> torch.nn.Module:
        """What is evaluated and saved as weights: the EMA model if there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def _fmt(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def describe(self) -> dict[str, Any]:
        """How this run trains, resolved: folder, precision, layout, device, processes,
        batches and the scaled learning rate."""
        b, d = self.batches, self.dist
        return {"run_dir": str(self.run_dir), "precision": self.precision,
                "channels_last": self.channels_last, "device": str(self.device),
                "compile": self.compiled, "compile_why": self.compile_why,
                "fused_bn": self.fused, "fused_bn_why": self.fused_why,
                "world": d.world, "backend": d.backend, "per_rank": b.per_rank,
                "accum": b.accum, "global_batch": b.global_, "lr": b.lr}

    def _run_config(self) -> dict[str, Any]:
        """config.json: the config, the model's, what was resolved, the software."""
        b = self.batches
        return {"train": dataclasses.asdict(self.cfg),
                "model": ckpt.config_to_dict(self.model.cfg),
                "resolved": {"precision": self.precision, "channels_last": self.channels_last,
                             "compile": self.compiled, "compile_why": self.compile_why,
                             "fused_bn": self.fused, "fused_bn_why": self.fused_why,
                             "device": str(self.device), "image_size": self.image_size,
                             "mean": self.mean, "std": self.std,
                             "world_size": self.dist.world, "backend": self.dist.backend,
                             "per_rank_batch": b.per_rank, "global_batch": b.global_,
                             "lr": b.lr},
                **environment()}

    def meta(self) -> dict[str, Any]:
        """What a weights file says of itself: classes, preprocessing, position."""
        return {"classes": self.train_data.classes,
                "preprocess": {"mean": list(self.mean), "std": list(self.std),
                               "image_size": self.image_size,
                               "in_chans": self.model.cfg.in_chans},
                "epoch": self.epoch, "step": self.global_step}

    def save(self, which: str) -> None:
        """Write the checkpoint WHICH (last, best) into the run folder."""
        self.folder.save(which, training_state(self), self.eval_model, self.meta())

    # ---- the loop ------------------------------------------------------------------
    def train_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]],
                   step_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's micro-batches: see TrainStep.__call__.
        Returns this rank's (loss sum, number correct) as tensors, without a device sync."""
        return self.step(micro, step_samples)

    def _seed(self, epoch: int, step: int, micro: int = 0) -> int:
        return draw_seed(self.cfg.seed, epoch, step, self.dist.rank * self.batches.accum + micro)

    def _batch(self, images: torch.Tensor, idx: torch.Tensor, epoch: int, step: int, micro: int):
        x = self.feed.augment(images, self._seed(epoch, step, micro), idx, epoch)
        x = x.to(self.device, self.dtype, memory_format=self._fmt, non_blocking=True)
        return x, self.train_data.labels[idx].to(self.device, non_blocking=True)

    def fit(self, until_epoch: int | None = None) -> dict[str, Any]:
        """Train to the last epoch (or stop after `until_epoch`, to continue later with
        resume); returns the test metrics. Ctrl-C saves a resumable checkpoint and re-raises
        KeyboardInterrupt; a NaN/inf loss raises NonFiniteLoss."""
        try:
            if self.dist.main:
                self.folder.open(self._run_config(), self.history, self.cfg.tensorboard,
                                 self.global_step)
            return self._fit(until_epoch)
        finally:
            self.folder.close()

    def _fit(self, until_epoch: int | None) -> dict[str, Any]:
        """The epochs, with Ctrl-C/SIGTERM/SIGUSR1 turned into a saved, resumable stop."""
        c, info = self.cfg, self.dist
        stop = min(until_epoch or c.epochs, c.epochs)
        progress = Progress(self.quiet)
        with self.signals.caught(min(25.0, c.dist_timeout) if info.active else None):
            try:
                while self.epoch < stop:
                    loss_sum, correct, seen, elapsed = self.train_epoch(progress)
                    loss_sum, correct, n = D.all_sum(loss_sum.cpu(), correct.cpu(),
                                                     torch.tensor(seen), info=info)
                    n = max(int(n), 1)
                    self._end_epoch(loss_sum.item() / n, correct.item() / n,
                                    n / elapsed if seen else 0.0, elapsed, progress)
            except KeyboardInterrupt:
                progress.stop()
                self._save_all("last")
                raise
            except RuntimeError as e:  # torch.distributed.DistError included
                failure = D.explain_failure(e, info, c.dist_timeout)
                if failure is None:
                    raise
                raise failure from None
            finally:
                progress.stop()
        return self._finish()

    def train_epoch(self, progress: Progress | None = None):
        """Train from the current position to the end of the epoch; returns this rank's
        (loss sum, number correct, samples, seconds). Raises NonFiniteLoss, or
        KeyboardInterrupt once every rank has stopped after the same whole step."""
        progress = progress or Progress(True)
        perm = D.epoch_permutation(len(self.train_data), self.cfg.seed, self.epoch)
        if self.step_in_epoch == 0:  # drop path: a different stream per rank and epoch
            torch.manual_seed(self._seed(self.epoch, -1))
        self.model.train()
        # the epoch's running sums: restored after a mid-epoch stop, so the epoch's metrics
        # row covers the whole epoch
        part = own_sums(self.epoch_partial, self.dist) if self.step_in_epoch else (0.0, 0, 0, 0.0)
        loss_sum = torch.tensor(part[0], device=self.device)
        correct = torch.tensor(part[1], dtype=torch.long, device=self.device)
        seen, t0 = part[2], time.perf_counter() - part[3]
        self._sums = (loss_sum, correct, seen, t0)
        progress.start(self.epoch + 1, self.cfg.epochs, self.steps_per_epoch, self.step_in_epoch)
        # The rest of the epoch's micro-batches, fetched in order (a streamed folder's
        # workers decode ahead of the step that needs them).
        plan = [D.step_indices(perm, s, self.batches, self.dist, self.cfg.drop_last)
                for s in range(self.step_in_epoch, self.steps_per_epoch)]
        images = self.train_data.batches([idx for parts in plan for idx in parts])
        for parts in plan:
            s = self.step_in_epoch
            step_samples = min(self.batches.global_, len(perm) - s * self.batches.global_)
            micro = [self._batch(next(images), idx, self.epoch, s, i)
                     for i, idx in enumerate(parts)]
            # this step's base lr (the schedule's, before it moves; groups may scale it)
            lr = self.batches.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            step_loss, ok = self.train_step(micro, step_samples)
            mean_loss, bad, stop_now = self._check_step(step_loss, step_samples)
            if bad is not None:
                raise NonFiniteLoss(
                    f"loss became {bad} at step {self.global_step + 1} (epoch {self.epoch + 1}, "
                    f"batch {s + 1}); stopped. {self.folder.last_good()}; lower lr or set "
                    f"grad_clip")
            loss_sum += step_loss
            correct += ok
            seen += sum(len(idx) for idx in parts)
            self._sums = (loss_sum, correct, seen, t0)
            self.step_in_epoch += 1
            self.global_step += 1
            if self.dist.main:
                self.folder.log_step(self.global_step, mean_loss, lr)
            progress.update(self.step_in_epoch, loss_sum, correct, seen, t0)
            self._save_mid_epoch()
            if stop_now:  # Ctrl-C, SIGTERM or SIGUSR1 lands here, between two steps
                raise KeyboardInterrupt
        return loss_sum, correct, seen, time.perf_counter() - t0

    def _save_mid_epoch(self) -> None:
        """The checkpoint every save_every_steps steps; the epoch's end saves anyway."""
        every = self.cfg.save_every_steps
        if every and self.global_step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
            self._save_all("last")

    def _check_step(self, step_loss: torch.Tensor, n: int) -> tuple[float, float | None, bool]:
        """(the step's mean loss over all ranks, the non-finite loss value if any rank's loss
        is NaN/inf, whether any rank was asked to stop), agreed by all ranks in one small
        collective."""
        flags = torch.tensor([step_loss.item(), float(self.signals.requested)],
                             dtype=torch.float64)
        flags, = D.all_sum(flags, info=self.dist)
        loss, stop = flags.tolist()
        mean = loss / max(n, 1)
        return mean, (None if math.isfinite(loss) else mean), stop > 0

    def _save_all(self, which: str) -> None:
        """Rank 0 writes the checkpoint; the others wait so none exits before it is on disk.
        Mid-epoch, the epoch's running sums of all ranks go along."""
        if self.step_in_epoch and self._sums is not None:
            loss_sum, correct, seen, t0 = self._sums
            rows = torch.zeros(self.dist.world, 3, dtype=torch.float64)  # each rank's sums
            rows[self.dist.rank] = torch.tensor([loss_sum.item(), correct.item(), seen])
            rows, = D.all_sum(rows, info=self.dist)
            self.epoch_partial = (rows.tolist(), time.perf_counter() - t0)
        else:
            self.epoch_partial = ([], 0.0)
        if self.dist.main:
            self.save(which)
        D.barrier(self.dist)

    def _check_finite_state(self) -> None:
        """Weights or BN statistics gone NaN/inf (a loss can stay finite while they do) stop
        the run before they are saved as good."""
        for name, t in (*self.model.state_dict().items(),
                        *(self.ema.state_dict().items() if self.ema is not None else ())):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteLoss(f"{name} became NaN or infinite in epoch {self.epoch}; "
                                    f"stopped without saving it. {self.folder.last_good()}; "
                                    f"lower lr or set grad_clip")

    def _end_epoch(self, train_loss, train_acc, ips, elapsed, progress) -> None:
        """The epoch's evaluation (every eval_every epochs and at the last), its metrics row,
        and its checkpoints: last, and best when the test accuracy improved."""
        done = self.epoch + 1
        ev = self._evaluate() if done % self.cfg.eval_every == 0 or done == self.cfg.epochs else None
        row = {"epoch": done, "step": self.global_step, "train_loss": train_loss,
               "train_acc": train_acc, "val_loss": ev and ev["loss"], "val_acc": ev and ev["top1"],
               "val_top5": ev and ev["top5"], "lr": self.optimizer.param_groups[0]["lr"],
               "epoch_s": elapsed, "images_per_s": ips, "peak_mem_mb": peak_memory_mb(self.device)}
        self.history.append(row)
        if ev is not None:
            self._last_eval = (self.global_step, ev)
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self._check_finite_state()
        if self.dist.main:
            self.folder.log_epoch(row, self.global_step)
        progress.epoch_done(row)
        new_best = ev is not None and ev["top1"] > self.best_acc
        if new_best:
            self.best_acc = ev["top1"]
        self._save_all("last")  # first: resume reads it, so a kill during "best" loses nothing
        if new_best:
            self._save_all("best")

    def _evaluate(self, tta: bool = False) -> dict[str, Any]:
        if not self.cfg.sync_bn:  # with SyncBN the running statistics are already equal
            D.broadcast_buffers([self.model] + ([self.ema] if self.ema is not None else []),
                                self.dist)
        return evaluate(self.eval_model, self.test_data, self.mean, self.std, 0, 1024,
                        self.precision, self.channels_last, self.device,
                        shard=(self.dist.rank, self.dist.world),
                        reduce=lambda *t: D.all_sum(*t, info=self.dist),
                        tta_flip=tta and self.cfg.tta_flip,
                        tta_shift=self.cfg.tta_shift if tta else 0)

    def _hparams(self) -> dict[str, Any]:
        """The run's settings as TensorBoard's hparams take them (numbers, text, booleans):
        the training config (lists and tables as JSON text) and what was resolved."""
        out: dict[str, Any] = {}
        for k, v in dataclasses.asdict(self.cfg).items():  # booleans as text, as "auto" is
            out[k] = str(v).lower() if isinstance(v, bool) else \
                v if isinstance(v, (int, float, str)) else json.dumps(v)
        out.update(precision=self.precision, channels_last=str(self.channels_last).lower(),
                   world_size=self.dist.world, global_batch=self.batches.global_,
                   lr_scaled=self.batches.lr)
        return out

    def _finish(self) -> dict[str, Any]:
        """The final test metrics (with test-time flips if asked), written as results.json
        and plots by rank 0."""
        step, ev = self._last_eval
        if step != self.global_step:  # the weights changed since the last epoch's evaluation
            ev = self._evaluate()
        plain = ev["top1"]
        tta = self.cfg.tta_flip or self.cfg.tta_shift > 0
        if tta:  # only the final evaluation; epochs are compared without it
            ev = self._evaluate(tta=True)
        result = {"test": ev, "best_top1": self.best_acc, "epochs": self.epoch,
                  "tta_flip": self.cfg.tta_flip, "tta_shift": self.cfg.tta_shift,
                  "wall_s": sum(h["epoch_s"] for h in self.history),
                  "compiled": self.compiled, "compile_s": self.step.compile_s,
                  "fused_bn": self.fused,
                  "peak_mem_mb": peak_memory_mb(self.device), "run_dir": str(self.run_dir),
                  "world_size": self.dist.world, "global_batch": self.batches.global_}
        if tta:
            result["test_top1_without_tta"] = plain
        if self.dist.main:
            self.folder.write_results(result)
            self.folder.log_hparams(self._hparams(), {
                "hparam/test_top1": ev["top1"], "hparam/test_loss": ev["loss"],
                "hparam/best_top1": self.best_acc, "hparam/wall_s": result["wall_s"]},
                self.global_step)
            if self.cfg.plots and self.history:
                from .plots import plot_run
                plot_run(self.history, ev["confusion"], self.test_data.classes, self.run_dir)
        return result

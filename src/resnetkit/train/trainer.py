"""The trainer: one loop for CPU or GPU, mixed precision, checkpoints, exact resume."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import weights as ckpt
from ..data import (ArrayDataset, StreamedFolder, in_memory_or_streamed, load_dataset,
                   select_classes)
from ..data import transforms as T
from ..errors import UserError
from ..evaluate import autocast, evaluate
from ..geometry import check_input_size
from ..options import parse_fields
from ..runtime import check_memory, decide_channels_last, decide_precision, peak_memory_mb
from ..untrusted import parse_json, path_component, shown
from ..zoo import create_model, get_config
from . import distributed as D
from .config import RESUMABLE, TrainConfig, build_config
from .finetune import freeze, freeze_batchnorm, start_from
from .optim import build_ema, build_optimizer, lr_factor
from .progress import Progress
from .runs import RunFolder, json_row, read_run_config


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _warn_if_collapsed(model, name: str, image_size: int) -> None:
    """Warn when the feature maps shrink to 1x1 before the last stage: those layers then see
    no spatial context (a ResNet-50 at 16x16 is 1x1 from its third stage on)."""
    from ..geometry import size_walk
    walk = size_walk(model, image_size)
    first = next((n for n, _, out in walk if out == 1), None)
    last_stage = model.stage_names[-1]
    if first is not None and not first.startswith(last_stage):
        warnings.warn(f"at image_size {image_size}, {name}'s feature maps are 1x1 from {first} "
                      f"on; use a larger --image_size or a network for small images "
                      f"(resnet20...)", stacklevel=3)


def _subset(data: ArrayDataset | StreamedFolder, n: int, seed: int):
    """A fixed random subset of n samples (all when n is 0 or too large)."""
    if not n or n >= len(data):
        return data
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n])


def _load_data(cfg: TrainConfig) -> tuple[ArrayDataset | StreamedFolder, ArrayDataset | StreamedFolder]:
    """The training and test splits, subset as asked. Image folders too large to hold
    decoded are streamed from disk (cache_images)."""
    train = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.image_size,
                         in_chans=cfg.model_overrides.get("in_chans", 3), on_bad=cfg.on_bad_image)
    train = in_memory_or_streamed(train, cfg.cache_images, cfg.workers)
    test = in_memory_or_streamed(
        load_dataset(cfg.dataset, "test", cfg.data_dir, cfg.image_size, train.shape[0],
                     on_bad=cfg.on_bad_image),
        cfg.cache_images, cfg.workers, train.classes)
    train = select_classes(train, cfg.classes, cfg.per_class, cfg.seed)
    test = select_classes(test, cfg.classes)
    return _subset(train, cfg.train_subset, cfg.seed), _subset(test, cfg.test_subset, cfg.seed)


class Trainer(RunFolder):
    """Trains a ResNet on a dataset as TrainConfig says; `fit()` runs to the end.

    Everything needed to resume (weights, optimizer, schedule, EMA, RNG states, position) is
    checkpointed atomically after every epoch and on Ctrl-C; `Trainer.resume(run_dir)`
    continues so that the result equals an uninterrupted run (bitwise on the CPU in
    deterministic mode)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path | None = None,
                 device: str | torch.device | None = None, quiet: bool = False,
                 load_init: bool = True):
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
        self.train_data, self.test_data = _load_data(cfg)
        if len(self.train_data.classes) < 2:
            raise UserError(f"dataset {cfg.dataset} has {len(self.train_data.classes)} class; a "
                            f"classifier needs at least 2")
        self.mean, self.std = self.train_data.mean, self.train_data.std
        self.image_size = cfg.image_size or self.train_data.shape[-1]
        shape = {**cfg.model_overrides, "in_chans": self.train_data.shape[0],
                 "num_classes": len(self.train_data.classes)}
        check_memory(get_config(cfg.model, **shape), self.image_size, cfg.batch_size,
                     training=True, what=f"training {cfg.model}")
        torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
        model = create_model(cfg.model, **shape)
        check_input_size(model, self.image_size)
        _warn_if_collapsed(model, cfg.model, self.image_size)
        self._start_from(model, cfg, load_init)
        # The resolved global batch and lr reference are written back into the config, so a
        # resumed run keeps them whatever its number of processes.
        self.batches = D.resolve_batches(cfg.batch_size, cfg.global_batch, cfg.accum_steps,
                                         self.dist.world, cfg.lr, cfg.lr_batch, cfg.lr_scale)
        self.cfg = cfg = dataclasses.replace(cfg, global_batch=self.batches.global_,
                                             lr_batch=self.batches.lr_batch)
        if cfg.sync_bn and self.dist.active:
            model = D.convert_sync_batchnorm(model, self.device)
        self.dtype = torch.float64 if self.precision == "fp64" else torch.float32
        self.model = model.to(self.device, self.dtype, memory_format=self._fmt)
        self.net = self.model  # what the training forward calls: the DDP wrapper under torchrun
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=not cfg.sync_bn)
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
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_acc, self.history = -1.0, []
        self.aug_gen = torch.Generator()
        self._tb, self._interrupted, self.stop_signal = None, False, None
        self._partial, self._sums, self._owner, self._lock = ([], 0.0), None, False, None
        self.run_dir = Path(D.broadcast_object(str(run_dir or self._new_run_dir()), self.dist))

    def _start_from(self, model, cfg: TrainConfig, load_init: bool) -> None:
        """Fine-tuning: initial weights (cfg.init; a resumed run has its own), their
        normalisation when it fits the data, frozen BatchNorm and frozen parts."""
        if cfg.init and load_init:
            pre = start_from(model, cfg.init).get("preprocess", {})
            if len(pre.get("mean", ())) == len(self.mean):  # the weights' own normalisation
                self.mean, self.std = tuple(pre["mean"]), tuple(pre["std"])
        if cfg.freeze_bn:
            freeze_batchnorm(model)
        if cfg.freeze:
            freeze(model, cfg.freeze)

    @property
    def _fmt(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _new_run_dir(self) -> Path:
        name = self.cfg.name or f"{self.cfg.model}-{self.cfg.dataset.split(':')[0]}-" \
                                f"{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(self.cfg.out_dir) / path_component(name, "run name")

    # ---- the loop ------------------------------------------------------------------
    def _augment(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """Augment a uint8 batch; the random draws depend only on `seed`, so a run is
        reproducible (and resumable mid-epoch) without carrying generator state."""
        c, g = self.cfg, self.aug_gen.manual_seed(seed)
        x = x.float() / 255
        if c.random_resized_crop:
            x = T.random_resized_crop(x, self.image_size, g)
        elif x.shape[-1] != self.image_size:
            x = T.resize_center_crop(x, self.image_size)
        if c.crop_padding:
            x = T.pad_random_crop(x, c.crop_padding, g)
        if c.hflip:
            x = T.hflip(x, g)
        x = T.normalize(x, self.mean, self.std)
        if c.random_erasing:
            x = T.random_erasing(x, g, c.random_erasing)
        return x

    def train_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]],
                   step_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's micro-batches (gradient accumulation; DDP
        averages over ranks at the last one). Each micro-batch's mean loss is weighted by its
        share of the `step_samples` of the whole step, so the gradient is the mean over the
        global batch even when the last step of an epoch is uneven. Returns this rank's
        (loss sum, number correct) as tensors, without a device sync."""
        n_step = step_samples or sum(len(y) for _, y in micro) * self.dist.world
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            sync = nullcontext() if last or self.net is self.model else self.net.no_sync()
            with sync:
                with autocast(self.device, self.precision):
                    out = self.net(x)
                    logits = out if out.dtype == torch.float64 else out.float()
                    loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
                weighted = loss * (len(y) * self.dist.world / n_step)
                (self.scaler.scale(weighted) if self.scaler else weighted).backward()
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return loss_sum, correct

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        return D.epoch_permutation(len(self.train_data), self.cfg.seed, epoch)

    def _seed(self, epoch: int, step: int, micro: int = 0) -> int:
        r = self.dist.rank * self.batches.accum + micro
        return ((self.cfg.seed * 100_003 + epoch) * 1_000_003 + step) * 4099 + r

    def _batch(self, images: torch.Tensor, idx: torch.Tensor, epoch: int, step: int, micro: int):
        x = self._augment(images, self._seed(epoch, step, micro))
        x = x.to(self.device, self.dtype, memory_format=self._fmt, non_blocking=True)
        return x, self.train_data.labels[idx].to(self.device, non_blocking=True)

    def fit(self, until_epoch: int | None = None) -> dict[str, Any]:
        """Train to the last epoch (or stop after `until_epoch`, to continue later with
        resume); returns the test metrics. Ctrl-C saves a resumable checkpoint and re-raises
        KeyboardInterrupt; a NaN/inf loss raises NonFiniteLoss."""
        try:
            if self.dist.main:
                self._prepare_run_dir()
            return self._fit(self.cfg, self.dist, until_epoch)
        finally:
            self._release_run_dir()

    def _fit(self, c: TrainConfig, info, until_epoch: int | None) -> dict[str, Any]:
        """The epochs, with Ctrl-C/SIGTERM/SIGUSR1 turned into a saved, resumable stop."""
        stop = min(until_epoch or c.epochs, c.epochs)
        progress = Progress(self.quiet)
        restore = self._catch_signals()
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
            text = str(e).lower()
            if info.active and any(w in text for w in ("timed out", "timeout")):
                raise UserError(
                    f"rank {info.rank}: a collective operation waited more than "
                    f"{c.dist_timeout:g} s (dist_timeout) for the other processes; one of them "
                    f"has failed or hung, see its output. ({str(e).splitlines()[0]})") from None
            if info.active and any(w in text for w in ("connection closed", "connection reset",
                                                       "broken pipe", "peer")):
                raise UserError(
                    f"rank {info.rank}: lost contact with another process of the job (it died or "
                    f"its machine went away); under torchrun --max-restarts the group restarts "
                    f"from the last checkpoint") from None
            raise
        finally:
            progress.stop()
            restore()
        return self._finish()

    def train_epoch(self, progress: "Progress | None" = None):
        """Train from the current position to the end of the epoch; returns this rank's
        (loss sum, number correct, samples, seconds). Raises NonFiniteLoss, or
        KeyboardInterrupt once every rank has stopped after the same whole step."""
        c, info = self.cfg, self.dist
        progress = progress or Progress(True)
        perm = self._epoch_perm(self.epoch)
        if self.step_in_epoch == 0:  # drop path: a different stream per rank and epoch
            torch.manual_seed(self._seed(self.epoch, -1))
        self.model.train()
        # the epoch's running sums: restored after a mid-epoch stop, so the epoch's metrics
        # row covers the whole epoch
        part = self._own_partial() if self.step_in_epoch else (0.0, 0, 0, 0.0)
        loss_sum = torch.tensor(part[0], device=self.device)
        correct = torch.tensor(part[1], dtype=torch.long, device=self.device)
        seen, t0 = part[2], time.perf_counter() - part[3]
        self._sums = (loss_sum, correct, seen, t0)
        progress.start(self.epoch + 1, c.epochs, self.steps_per_epoch, self.step_in_epoch)
        # The rest of the epoch's micro-batches, fetched in order (a streamed folder's
        # workers decode ahead of the step that needs them).
        plan = [D.step_indices(perm, s, self.batches, info, c.drop_last)
                for s in range(self.step_in_epoch, self.steps_per_epoch)]
        images = self.train_data.batches([idx for parts in plan for idx in parts])
        for parts in plan:
            s = self.step_in_epoch
            step_samples = min(self.batches.global_, len(perm) - s * self.batches.global_)
            micro = [self._batch(next(images), idx, self.epoch, s, i)
                     for i, idx in enumerate(parts)]
            step_loss, ok = self.train_step(micro, step_samples)
            n_local = sum(len(idx) for idx in parts)
            bad, stop_now = self._check_step(step_loss, step_samples)
            if bad is not None:
                raise NonFiniteLoss(
                    f"loss became {bad} at step {self.global_step + 1} (epoch {self.epoch + 1}, "
                    f"batch {s + 1}); stopped. {self._last_good()}; lower lr or set grad_clip")
            loss_sum += step_loss
            correct += ok
            seen += n_local
            self._sums = (loss_sum, correct, seen, t0)
            self.step_in_epoch += 1
            self.global_step += 1
            progress.update(self.step_in_epoch, loss_sum, correct, seen, t0)
            every = c.save_every_steps
            if every and self.global_step % every == 0 and self.step_in_epoch < self.steps_per_epoch:
                self._save_all("last")  # mid-epoch; the epoch's end saves anyway
            if stop_now:  # Ctrl-C, SIGTERM or SIGUSR1 lands here, between two steps
                raise KeyboardInterrupt
        return loss_sum, correct, seen, time.perf_counter() - t0

    def _check_step(self, step_loss: torch.Tensor, n: int) -> tuple[float | None, bool]:
        """(the non-finite loss value if any rank's loss is NaN/inf, whether any rank was
        asked to stop), agreed by all ranks in one small collective."""
        flags = torch.tensor([step_loss.item(), float(self._interrupted)], dtype=torch.float64)
        flags, = D.all_sum(flags, info=self.dist)
        loss, stop = flags.tolist()
        return (None if math.isfinite(loss) else loss / max(n, 1)), stop > 0

    def _save_all(self, which: str) -> None:
        """Rank 0 writes the checkpoint; the others wait so none exits before it is on disk.
        Mid-epoch, the epoch's running sums of all ranks go along."""
        if self.step_in_epoch and self._sums is not None:
            loss_sum, correct, seen, t0 = self._sums
            rows = torch.zeros(self.dist.world, 3, dtype=torch.float64)  # each rank's sums
            rows[self.dist.rank] = torch.tensor([loss_sum.item(), correct.item(), seen])
            rows, = D.all_sum(rows, info=self.dist)
            self._partial = (rows.tolist(), time.perf_counter() - t0)
        else:
            self._partial = ([], 0.0)
        if self.dist.main:
            self.save(which)
        D.barrier(self.dist)

    def _own_partial(self) -> tuple[float, int, int, float]:
        """This rank's running sums of the interrupted epoch: its own row when the world size
        is the one that saved them (so the sums add up in the same order), else rank 0 takes
        the totals."""
        rows, elapsed = self._partial
        if len(rows) == self.dist.world:
            loss, correct, seen = rows[self.dist.rank]
        elif rows and self.dist.main:
            loss, correct, seen = (sum(col) for col in zip(*rows))
        else:
            loss, correct, seen = 0.0, 0, 0
        return loss, int(correct), int(seen), elapsed

    def _check_finite_state(self) -> None:
        """Weights or BN statistics gone NaN/inf (a loss can stay finite while they do) stop
        the run before they are saved as good."""
        for name, t in (*self.model.state_dict().items(),
                        *(self.ema.state_dict().items() if self.ema is not None else ())):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteLoss(f"{name} became NaN or infinite in epoch {self.epoch}; "
                                    f"stopped without saving it. {self._last_good()}; lower "
                                    f"lr or set grad_clip")

    def _catch_signals(self):
        """Turn the first Ctrl-C, SIGTERM or SIGUSR1 into a flag checked after each step, so
        the checkpoint holds a whole step; a second signal interrupts at once."""
        self._interrupted = False
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted, self.stop_signal = True, signum
            if signum == signal.SIGTERM and self.dist.active:  # a stuck rank must not outlive the job
                grace = threading.Timer(min(25.0, self.cfg.dist_timeout), os._exit, (143,))
                grace.daemon = True
                grace.start()
        # SIGTERM: kill, docker stop, systemd, torchrun; SIGUSR1: Slurm's warning before a
        # preemption (sbatch --signal=USR1@60)
        sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1]
        old = {s: signal.signal(s, handler) for s in sigs}
        return lambda: [signal.signal(s, h) for s, h in old.items()]

    def _end_epoch(self, train_loss, train_acc, ips, elapsed, progress) -> None:
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
            try:
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json_row(row) + "\n")
            except OSError as e:
                raise UserError(f"cannot write {self.run_dir / 'metrics.jsonl'}: "
                                f"{e.strerror or e}") from None
        progress.epoch_done(row)
        if self._tb is not None:
            for k, v in row.items():
                if v is not None:
                    self._tb.add_scalar(k, v, self.epoch)
        new_best = ev is not None and ev["top1"] > self.best_acc
        if new_best:
            self.best_acc = ev["top1"]
        self._save_all("last")  # first: resume reads it, so a kill during "best" loses nothing
        if new_best:
            self._save_all("best")

    def _evaluate(self, tta_flip: bool = False) -> dict[str, Any]:
        if not self.cfg.sync_bn:  # with SyncBN the running statistics are already equal
            D.broadcast_buffers([self.model] + ([self.ema] if self.ema is not None else []),
                                self.dist)
        return evaluate(self.eval_model, self.test_data, self.mean, self.std, 0, 1024,
                        self.precision, self.channels_last, self.device,
                        shard=(self.dist.rank, self.dist.world),
                        reduce=lambda *t: D.all_sum(*t, info=self.dist), tta_flip=tta_flip)

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _finish(self) -> dict[str, Any]:
        step, ev = getattr(self, "_last_eval", (-1, None))
        if step != self.global_step:  # the weights changed since the last epoch's evaluation
            ev = self._evaluate()
        plain = ev["top1"]
        if self.cfg.tta_flip:  # only the final evaluation; epochs are compared without it
            ev = self._evaluate(tta_flip=True)
        result = {"test": ev, "best_top1": self.best_acc, "epochs": self.epoch,
                  "tta_flip": self.cfg.tta_flip,
                  "wall_s": sum(h["epoch_s"] for h in self.history),
                  "peak_mem_mb": peak_memory_mb(self.device), "run_dir": str(self.run_dir),
                  "world_size": self.dist.world, "global_batch": self.batches.global_}
        if self.cfg.tta_flip:
            result["test_top1_without_tta"] = plain
        if not self.dist.main:
            return result
        (self.run_dir / "results.json").write_text(json.dumps(result, indent=1))
        if self.cfg.plots and self.history:
            from .plots import plot_run
            plot_run(self.history, ev["confusion"], self.test_data.classes, self.run_dir)
        if self._tb is not None:
            self._tb.close()
        return result

    @classmethod
    def resume(cls, run_dir: str | Path, device=None, quiet: bool = False,
               **changes: Any) -> "Trainer":
        """Rebuild a run from RUN_DIR/config.json and continue from last.state.pt.
        `changes` may only extend the run (epochs)."""
        run_dir = Path(run_dir)
        info = read_run_config(run_dir)
        bad = set(changes) - set(RESUMABLE)
        if bad:
            raise UserError(f"a resumed run keeps its config; only {' and '.join(RESUMABLE)} "
                            f"can change, not {', '.join(sorted(bad))}")
        try:
            cfg = TrainConfig(**{**info["train"], **changes})
        except TypeError as e:  # an unknown or missing field in config.json
            raise UserError(f"{run_dir / 'config.json'} does not describe a run ({e})") from None
        state_file = run_dir / "last.state.pt"
        fresh = not state_file.exists()  # stopped before its first checkpoint: start again
        t = cls(cfg, run_dir=run_dir, device=device, quiet=quiet, load_init=fresh)
        t._owner = True
        if fresh:
            return t
        resolved = info.get("resolved", {})
        if isinstance(resolved, dict) and "mean" in resolved:
            # the run's normalisation (an init checkpoint's, if it had one), checked as any
            # preprocessing read from a file is
            pre = ckpt.check_preprocess({"mean": resolved.get("mean"), "std": resolved.get("std"),
                                         "image_size": t.image_size}, len(t.mean),
                                        str(run_dir / "config.json"))
            t.mean, t.std = tuple(pre["mean"]), tuple(pre["std"])
        s = ckpt.load_state(state_file)
        try:
            t._restore(s, str(state_file))
        except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"{state_file} is damaged ({type(e).__name__}: {e}); resume from "
                            f"an earlier copy or start again") from None
        return t

    def _restore(self, s: dict[str, Any], source: str) -> None:
        """Everything a training state holds, back into this trainer."""
        ckpt.check_finite(s["model"], source)
        ckpt.load_weights_into(self.model, s["model"], source)
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if self.ema is not None and s["ema"]:
            self.ema.load_state_dict(s["ema"])
        if self.scaler and s["scaler"]:
            self.scaler.load_state_dict(s["scaler"])
        self.epoch, self.step_in_epoch = int(s["epoch"]), int(s["step_in_epoch"])
        self.global_step, self.best_acc = int(s["global_step"]), float(s["best_acc"])
        self.history = parse_json(s["history"], source, "history")
        if not isinstance(self.history, list):
            raise UserError(f"{shown(source)}: its history is not a list of epochs")
        self._partial = tuple(s.get("epoch_partial", ([], 0.0)))
        if s.get("world_size", 1) == self.dist.world:  # the drop-path stream, mid-epoch
            torch.set_rng_state(s["torch_rng"])


def start_run(recipe: str | None = None, options: dict[str, str] | None = None,
              resume: str | Path | None = None) -> Trainer:
    """A Trainer from command-line text: a new run from a recipe and "--key value" options,
    or the run folder `resume` continued (then only RESUMABLE options may be given). Under
    torchrun --max-restarts, a restarted group continues its named run from the last
    checkpoint."""
    options = options or {}
    if resume is None:
        cfg = build_config(recipe, options)
        restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
        if restarts and not cfg.name:
            raise UserError("under torchrun --max-restarts, give the run a --name, so that a "
                            "restarted group finds its checkpoint")
        run_dir = Path(cfg.out_dir) / cfg.name
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) and \
                (run_dir / "config.json").exists():
            return Trainer.resume(run_dir)
        return Trainer(cfg)
    if recipe:
        raise UserError("--resume continues a run with its own recipe; drop --recipe")
    changes = parse_fields(TrainConfig, options, "train option")
    if set(changes) - set(RESUMABLE):
        raise UserError(f"with --resume only {' and '.join('--' + k for k in RESUMABLE)} "
                        f"may be given")
    return Trainer.resume(resume, **changes)

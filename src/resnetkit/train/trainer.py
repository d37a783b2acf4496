"""The trainer: one loop for CPU or GPU, mixed precision, checkpoints, exact resume."""
from __future__ import annotations

import dataclasses
import json
import platform
import resource
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import __version__
from ..data import ArrayDataset, load_dataset, materialize
from ..data import transforms as T
from ..errors import UserError
from ..zoo import create_model
from . import checkpoint as ckpt
from .config import TrainConfig
from .optim import build_ema, build_optimizer, lr_factor


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def has_native_bf16(device: torch.device) -> bool:
    """x86 CPUs with AVX512-BF16 or AMX-BF16 instructions; any bf16-capable CUDA device."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(cfg: TrainConfig, device: torch.device) -> tuple[str, bool]:
    """(precision, channels_last) for the device. bf16 on the CPU pays off only with
    channels_last (REFERENCE.md section 5); fp32 on the CPU trains faster in NCHW."""
    prec = cfg.precision
    if prec == "auto":
        prec = "bf16" if has_native_bf16(device) else ("fp16" if device.type == "cuda" else "fp32")
    if prec == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    cl = str(cfg.channels_last).lower()
    channels_last = (prec != "fp32" or device.type == "cuda") if cl == "auto" else cl == "true"
    return prec, channels_last


def evaluate(model: torch.nn.Module, data: ArrayDataset, mean, std, image_size: int = 0,
             batch_size: int = 1024, precision: str = "fp32", channels_last: bool = False,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Top-1, top-5, loss, per-class accuracy and the confusion matrix on a dataset."""
    device = torch.device(device)
    n_cls = len(data.classes)
    conf = torch.zeros(n_cls, n_cls, dtype=torch.long)
    loss_sum, top5 = 0.0, 0
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = prepare(data.images[i:i + batch_size], mean, std, image_size)
            y = data.labels[i:i + batch_size]
            with _autocast(device, precision):
                out = model(x.to(device, memory_format=fmt)).float().cpu()
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            k = min(5, out.shape[1])
            top5 += (out.topk(k, 1).indices == y[:, None]).any(1).sum().item()
            conf += torch.bincount(y * n_cls + out.argmax(1), minlength=n_cls * n_cls).view(n_cls, n_cls)
    n = max(len(data), 1)
    per_class = (conf.diag().float() / conf.sum(1).clamp(min=1)).tolist()
    return {"top1": conf.diag().sum().item() / n, "top5": top5 / n, "loss": loss_sum / n,
            "per_class": dict(zip(data.classes, per_class)), "confusion": conf.tolist(),
            "samples": len(data)}


def prepare(images: torch.Tensor, mean, std, image_size: int = 0) -> torch.Tensor:
    """uint8 images -> normalised float batch at the eval size (resize + centre crop)."""
    x = images.float() / 255
    if image_size and x.shape[-1] != image_size:
        x = T.resize_center_crop(x, image_size)
    return T.normalize(x, mean, std)


def _autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


class Trainer:
    """Trains a ResNet on a dataset as TrainConfig says; `fit()` runs to the end.

    Everything needed to resume (weights, optimizer, schedule, EMA, RNG states, position) is
    checkpointed atomically after every epoch and on Ctrl-C; `Trainer.resume(run_dir)`
    continues so that the result equals an uninterrupted run (bitwise on the CPU in
    deterministic mode)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path | None = None,
                 device: str | torch.device | None = None, quiet: bool = False):
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.quiet = quiet
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.seed)
        self.precision, self.channels_last = resolve_precision(cfg, self.device)
        train = load_dataset(cfg.dataset, "train", cfg.data_dir, cfg.image_size,
                             in_chans=cfg.model_overrides.get("in_chans", 3), on_bad=cfg.on_bad_image)
        self.train_data = materialize(train, cfg.workers)
        self.test_data = materialize(load_dataset(cfg.dataset, "test", cfg.data_dir,
                                                  cfg.image_size, self.train_data.images.shape[1],
                                                  on_bad=cfg.on_bad_image),
                                     cfg.workers, self.train_data.classes)
        if cfg.train_subset:
            g = torch.Generator().manual_seed(cfg.seed)
            keep = torch.randperm(len(self.train_data), generator=g)[:cfg.train_subset]
            d = self.train_data
            self.train_data = ArrayDataset(d.images[keep], d.labels[keep], d.classes, d.mean, d.std)
        self.mean, self.std = self.train_data.mean, self.train_data.std
        self.image_size = cfg.image_size or self.train_data.images.shape[-1]
        model = create_model(cfg.model, **{**cfg.model_overrides,
                                           "in_chans": self.train_data.images.shape[1],
                                           "num_classes": len(self.train_data.classes)})
        if self.image_size < model.min_input_size:
            raise UserError(f"image_size {self.image_size} is too small for {cfg.model}: it "
                            f"needs at least {model.min_input_size}")
        self.model = model.to(self.device, memory_format=self._fmt)
        self.steps_per_epoch = len(self.train_data) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"batch_size {cfg.batch_size} is larger than the {len(self.train_data)} "
                            f"training samples")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg, self.total_steps, self.steps_per_epoch))
        self.ema = build_ema(self.model, cfg.ema_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_acc, self.history = -1.0, []
        self.aug_gen = torch.Generator().manual_seed(cfg.seed)
        self.run_dir = Path(run_dir) if run_dir else self._new_run_dir()

    @property
    def _fmt(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _new_run_dir(self) -> Path:
        name = self.cfg.name or f"{self.cfg.model}-{self.cfg.dataset.split(':')[0]}-" \
                                f"{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(self.cfg.out_dir) / name

    # ---- the loop ------------------------------------------------------------------
    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        c, g = self.cfg, self.aug_gen
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

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (loss, number correct) as tensors (no sync)."""
        with _autocast(self.device, self.precision):
            out = self.model(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=self.cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
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
        return loss.detach(), (out.argmax(1) == y).sum()

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return torch.randperm(len(self.train_data), generator=g)

    def fit(self, until_epoch: int | None = None) -> dict[str, Any]:
        """Train to the last epoch (or stop after `until_epoch`, to continue later with
        resume); returns the test metrics. Ctrl-C saves a resumable checkpoint and re-raises
        KeyboardInterrupt; a NaN/inf loss raises NonFiniteLoss."""
        self._prepare_run_dir()
        c, B = self.cfg, self.cfg.batch_size
        stop = min(until_epoch or c.epochs, c.epochs)
        progress = _Progress(self.quiet)
        restore = self._catch_sigint()
        try:
            while self.epoch < stop:
                perm = self._epoch_perm(self.epoch)
                if self.step_in_epoch == 0:
                    self.aug_gen.manual_seed(c.seed * 100_003 + self.epoch)
                self.model.train()
                loss_sum = torch.zeros((), device=self.device)
                correct = torch.zeros((), dtype=torch.long, device=self.device)
                seen, t0 = 0, time.perf_counter()
                progress.start(self.epoch + 1, c.epochs, self.steps_per_epoch, self.step_in_epoch)
                while self.step_in_epoch < self.steps_per_epoch:
                    idx = perm[self.step_in_epoch * B:(self.step_in_epoch + 1) * B]
                    x = self._augment(self.train_data.images[idx])
                    x = x.to(self.device, memory_format=self._fmt, non_blocking=True)
                    y = self.train_data.labels[idx].to(self.device, non_blocking=True)
                    loss, ok = self.train_step(x, y)
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(
                            f"loss became {loss.item()} at step {self.global_step + 1} (epoch "
                            f"{self.epoch + 1}, batch {self.step_in_epoch + 1}); stopped. The last "
                            f"good checkpoint is in {self.run_dir}; lower lr or set grad_clip")
                    loss_sum += loss * len(idx)
                    correct += ok
                    seen += len(idx)
                    self.step_in_epoch += 1
                    self.global_step += 1
                    progress.update(self.step_in_epoch, loss_sum, correct, seen, t0)
                    if self._interrupted:  # Ctrl-C lands here, between two whole steps
                        raise KeyboardInterrupt
                elapsed = time.perf_counter() - t0
                self._end_epoch(loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1),
                                seen / elapsed if seen else 0.0, elapsed, progress)
        except KeyboardInterrupt:
            progress.stop()
            self.save("last")
            raise
        finally:
            progress.stop()
            restore()
        return self._finish()

    def _catch_sigint(self):
        """Turn the first Ctrl-C into a flag checked after each step, so the checkpoint
        holds a whole step; a second Ctrl-C interrupts at once."""
        self._interrupted = False
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum, frame):
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True
        old = signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, old)

    def _end_epoch(self, train_loss, train_acc, ips, elapsed, progress) -> None:
        ev = evaluate(self.eval_model, self.test_data, self.mean, self.std, 0, 1024,
                      self.precision, self.channels_last, self.device)
        row = {"epoch": self.epoch + 1, "step": self.global_step, "train_loss": train_loss,
               "train_acc": train_acc, "val_loss": ev["loss"], "val_acc": ev["top1"],
               "val_top5": ev["top5"], "lr": self.optimizer.param_groups[0]["lr"],
               "epoch_s": elapsed, "images_per_s": ips, "peak_mem_mb": peak_memory_mb(self.device)}
        self.history.append(row)
        self._last_eval = (self.global_step, ev)
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        progress.epoch_done(row)
        if self._tb is not None:
            for k, v in row.items():
                self._tb.add_scalar(k, v, self.epoch)
        if ev["top1"] > self.best_acc:
            self.best_acc = ev["top1"]
            self.save("best")
        self.save("last")

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _finish(self) -> dict[str, Any]:
        step, ev = getattr(self, "_last_eval", (-1, None))
        if step != self.global_step:  # the weights changed since the last epoch's evaluation
            ev = evaluate(self.eval_model, self.test_data, self.mean, self.std, 0, 1024,
                          self.precision, self.channels_last, self.device)
        result = {"test": ev, "best_top1": self.best_acc, "epochs": self.epoch,
                  "wall_s": sum(h["epoch_s"] for h in self.history),
                  "peak_mem_mb": peak_memory_mb(self.device), "run_dir": str(self.run_dir)}
        (self.run_dir / "results.json").write_text(json.dumps(result, indent=1))
        if self.cfg.plots and self.history:
            from .plots import plot_run
            plot_run(self.history, ev["confusion"], self.test_data.classes, self.run_dir)
        if self._tb is not None:
            self._tb.close()
        return result

    # ---- run folder, checkpoints, resume ---------------------------------------------
    def _prepare_run_dir(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            info = {"train": dataclasses.asdict(self.cfg),
                    "model": ckpt.config_to_dict(self.model.cfg),
                    "resolved": {"precision": self.precision, "channels_last": self.channels_last,
                                 "device": str(self.device), "image_size": self.image_size,
                                 "mean": self.mean, "std": self.std},
                    "versions": {"resnetkit": __version__, "torch": torch.__version__,
                                 "python": platform.python_version()},
                    "command": sys.argv}
            ckpt.atomic_write(self.run_dir / "config.json",
                              lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
        except OSError as e:
            raise UserError(f"cannot write to run folder {self.run_dir}: {e.strerror or e}") from None
        self._tb = None
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.run_dir / "tb"))

    def meta(self) -> dict[str, Any]:
        return {"classes": self.train_data.classes,
                "preprocess": {"mean": list(self.mean), "std": list(self.std),
                               "image_size": self.image_size,
                               "in_chans": self.model.cfg.in_chans},
                "epoch": self.epoch, "step": self.global_step}

    def save(self, which: str) -> None:
        """Write WHICH.safetensors (the eval model's weights) and WHICH.state.pt (the rest);
        state first, so a weights file never claims a position its state lacks."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else {},
                 "scaler": self.scaler.state_dict() if self.scaler else {},
                 "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                 "global_step": self.global_step, "best_acc": self.best_acc,
                 "history": json.dumps(self.history),
                 "torch_rng": torch.get_rng_state(), "aug_rng": self.aug_gen.get_state()}
        ckpt.save_state(self.run_dir / f"{which}.state.pt", state)
        ckpt.save_weights(self.run_dir / f"{which}.safetensors", self.eval_model, self.meta())

    @classmethod
    def resume(cls, run_dir: str | Path, device=None, quiet: bool = False,
               **changes: Any) -> "Trainer":
        """Rebuild a run from RUN_DIR/config.json and continue from last.state.pt.
        `changes` may only extend the run (epochs)."""
        run_dir = Path(run_dir)
        try:
            info = json.loads((run_dir / "config.json").read_text())
        except FileNotFoundError:
            raise UserError(f"{run_dir} is not a run folder (no config.json)") from None
        bad = set(changes) - {"epochs"}
        if bad:
            raise UserError(f"a resumed run keeps its config; only epochs can change, not "
                            f"{', '.join(sorted(bad))}")
        cfg = TrainConfig(**{**info["train"], **changes})
        t = cls(cfg, run_dir=run_dir, device=device, quiet=quiet)
        s = ckpt.load_state(run_dir / "last.state.pt")
        ckpt.load_weights_into(t.model, s["model"], str(run_dir / "last.state.pt"))
        t.optimizer.load_state_dict(s["optimizer"])
        t.scheduler.load_state_dict(s["scheduler"])
        if t.ema is not None and s["ema"]:
            t.ema.load_state_dict(s["ema"])
        if t.scaler and s["scaler"]:
            t.scaler.load_state_dict(s["scaler"])
        t.epoch, t.step_in_epoch, t.global_step = s["epoch"], s["step_in_epoch"], s["global_step"]
        t.best_acc, t.history = s["best_acc"], json.loads(s["history"])
        torch.set_rng_state(s["torch_rng"])
        t.aug_gen.set_state(s["aug_rng"])
        return t


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e6
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # Linux reports KiB


class _Progress:
    """A rich progress bar on a terminal; one line per epoch otherwise (CI, logs)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.live = sys.stdout.isatty() and not quiet
        self.bar = None

    def start(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)
            self.bar = Progress(TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(),
                                MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                                TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("train", total=steps, completed=done, stats="")

    def update(self, step: int, loss_sum, correct, seen: int, t0: float) -> None:
        if self.bar is not None and (step % 10 == 0 or step == self.steps):
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            self.bar.update(self.task, completed=step,
                            stats=f"loss {loss_sum.item() / seen:.4f} acc "
                                  f"{100 * correct.item() / seen:.2f}% {rate:.0f} img/s")

    def epoch_done(self, row: dict[str, Any]) -> None:
        self.stop()
        if not self.quiet:
            print(f"epoch {row['epoch']}/{self.epochs}: train loss {row['train_loss']:.4f} "
                  f"acc {100 * row['train_acc']:.2f}% | test loss {row['val_loss']:.4f} "
                  f"acc {100 * row['val_acc']:.2f}% top5 {100 * row['val_top5']:.2f}% | "
                  f"{row['images_per_s']:.0f} img/s, {row['epoch_s']:.1f} s", flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

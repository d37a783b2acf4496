"""Training progress: a rich progress bar on a terminal, one line per epoch otherwise."""
from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
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
            test = "not evaluated (eval_every)" if row["val_acc"] is None else \
                f"loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}% " \
                f"top5 {100 * row['val_top5']:.2f}%"
            print(f"epoch {row['epoch']}/{self.epochs}: train loss {row['train_loss']:.4f} "
                  f"acc {100 * row['train_acc']:.2f}% | test {test} | "
                  f"{row['images_per_s']:.0f} img/s, {row['epoch_s']:.1f} s", flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

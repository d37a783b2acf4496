"""Stopping and continuing a run: the signals that stop it at a whole step, what its
training state holds and how it comes back (`resume`), and the decision of a group that
torchrun restarted to continue its run."""
from __future__ import annotations

import json
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import weights as ckpt
from ..errors import UserError
from ..untrusted import parse_json, shown
from .config import RESUMABLE, TrainConfig
from .runs import json_row, last_state, read_run_config


class StopSignals:
    """Ctrl-C, SIGTERM and SIGUSR1 turned into a request to stop after the current step,
    so that the checkpoint holds a whole step. `requested` is the flag the loop checks;
    `signum` the signal that asked."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None

    @contextmanager
    def caught(self, grace_s: float | None = None) -> Iterator["StopSignals"]:
        """Catch the signals inside the block (only the main thread can); a second signal
        interrupts at once. With `grace_s` (a distributed job), a SIGTERM also starts a
        timer that ends the process after that many seconds, so a stuck rank does not
        outlive the job."""
        self.requested = False
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested, self.signum = True, signum
            if signum == signal.SIGTERM and grace_s is not None:
                grace = threading.Timer(grace_s, os._exit, (143,))
                grace.daemon = True
                grace.start()
        # SIGTERM: kill, docker stop, systemd, torchrun; SIGUSR1: Slurm's warning before a
        # preemption (sbatch --signal=USR1@60)
        sigs = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1]
        old = {s: signal.signal(s, handler) for s in sigs}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# training_state and restore are each other's inverse: what a checkpoint holds.
def training_state(t) -> dict[str, Any]:
    """Everything trainer `t` needs to continue exactly: weights, optimizer, schedule, EMA,
    loss scaler, position, history, the RNG state and the interrupted epoch's sums."""
    return {"model": t.model.state_dict(), "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "ema": t.ema.state_dict() if t.ema is not None else {},
            "scaler": t.scaler.state_dict() if t.scaler else {},
            "epoch": t.epoch, "step_in_epoch": t.step_in_epoch,
            "global_step": t.global_step, "best_acc": t.best_acc,
            "history": json_row(t.history), "world_size": t.dist.world,
            "torch_rng": torch.get_rng_state(), "epoch_partial": list(t.epoch_partial)}


def restore(t, s: dict[str, Any], source: str) -> None:
    """Everything training state `s` (read from `source`) holds, back into trainer `t`."""
    ckpt.check_finite(s["model"], source)
    ckpt.load_weights_into(t.model, s["model"], source)
    t.optimizer.load_state_dict(s["optimizer"])
    t.scheduler.load_state_dict(s["scheduler"])
    if t.ema is not None and s["ema"]:
        t.ema.load_state_dict(s["ema"])
    if t.scaler and s["scaler"]:
        t.scaler.load_state_dict(s["scaler"])
    t.epoch, t.step_in_epoch = int(s["epoch"]), int(s["step_in_epoch"])
    t.global_step, t.best_acc = int(s["global_step"]), float(s["best_acc"])
    t.history = parse_json(s["history"], source, "history")
    if not isinstance(t.history, list):
        raise UserError(f"{shown(source)}: its history is not a list of epochs")
    t.epoch_partial = tuple(s.get("epoch_partial", ([], 0.0)))
    if s.get("world_size", 1) == t.dist.world:  # the drop-path stream, mid-epoch
        torch.set_rng_state(s["torch_rng"])


def own_sums(partial: tuple[list, float], info) -> tuple[float, int, int, float]:
    """This rank's running sums (loss, correct, seen, seconds) of the interrupted epoch
    `partial` (every rank's rows, seconds): its own row when the world size is the one that
    saved them (so the sums add up in the same order), else rank 0 takes the totals."""
    rows, elapsed = partial
    if len(rows) == info.world:
        loss, correct, seen = rows[info.rank]
    elif rows and info.main:
        loss, correct, seen = (sum(col) for col in zip(*rows))
    else:
        loss, correct, seen = 0.0, 0, 0
    return loss, int(correct), int(seen), elapsed


def resume(make: Callable[..., Any], run_dir: str | Path, device=None, quiet: bool = False,
           **changes: Any):
    """The trainer `make(cfg, run_dir=..., device=..., quiet=..., load_init=...)` (the
    Trainer class) rebuilt from RUN_DIR/config.json and continued from last.state.pt.
    `changes` may only extend the run (RESUMABLE). Raises UserError for a folder that is
    not a run or a damaged state."""
    run_dir = Path(run_dir)
    info = read_run_config(run_dir)
    bad = set(changes) - set(RESUMABLE)
    if bad:
        raise UserError(f"a resumed run keeps its config; only {' and '.join(RESUMABLE)} "
                        f"can change, not {', '.join(sorted(bad))}")
    # a run saved before the step could be compiled ran eagerly: it continues so (an "auto"
    # decided again could compile it, and the result would no longer equal an uninterrupted run)
    train = {"compile": False, **info["train"]} if isinstance(info.get("train"), dict) \
        else info.get("train")
    try:
        cfg = TrainConfig(**{**train, **changes})
    except TypeError as e:  # an unknown or missing field in config.json
        raise UserError(f"{run_dir / 'config.json'} does not describe a run ({e})") from None
    state_file = last_state(run_dir)
    fresh = not state_file.exists()  # stopped before its first checkpoint: start again
    t = make(cfg, run_dir=run_dir, device=device, quiet=quiet, load_init=fresh)
    t.folder.resuming = True
    if fresh:
        return t
    resolved = info.get("resolved", {})
    if isinstance(resolved, dict) and "mean" in resolved:
        # the run's normalisation (an init checkpoint's, if it had one), checked as any
        # preprocessing read from a file is
        pre = ckpt.check_preprocess({"mean": resolved.get("mean"), "std": resolved.get("std"),
                                     "image_size": t.image_size}, len(t.mean),
                                    str(run_dir / "config.json"))
        t.feed.mean, t.feed.std = tuple(pre["mean"]), tuple(pre["std"])
    s = ckpt.load_state(state_file)
    try:
        restore(t, s, str(state_file))
    except (KeyError, TypeError, ValueError, RuntimeError, json.JSONDecodeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{state_file} is damaged ({type(e).__name__}: {e}); resume from "
                        f"an earlier copy or start again") from None
    return t


def elastic_restart(cfg: TrainConfig) -> Path | None:
    """Under torchrun --max-restarts, the run folder a restarted group continues (its
    config.json exists), else None. Raises UserError for an unnamed run under restarts: a
    restarted group could not find its checkpoint."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts and not cfg.name:
        raise UserError("under torchrun --max-restarts, give the run a --name, so that a "
                        "restarted group finds its checkpoint")
    run_dir = Path(cfg.out_dir) / cfg.name
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) and \
            (run_dir / "config.json").exists():
        return run_dir
    return None

"""A training run's folder: claimed by one process at a time, its config, its checkpoints
(weights as safetensors, the rest as a training state), its metrics."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from .. import weights as ckpt
from ..errors import UserError
from ..untrusted import parse_json, regular_file, shown


def json_row(obj: Any) -> str:
    """JSON with non-finite numbers written as null (bare NaN is not JSON)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return [clean(x) for x in v] if isinstance(v, list) else v
    return json.dumps(clean(obj), allow_nan=False)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/config.json, an untrusted file: one sentence if it is missing or damaged."""
    path = run_dir / "config.json"
    try:
        text = regular_file(path, "run config").read_bytes()
    except UserError:
        if not path.exists():
            raise UserError(f"{shown(run_dir)} is not a run folder (no config.json)") from None
        raise
    except OSError as e:
        raise UserError(f"{shown(path)} cannot be read ({e.strerror or e}); the run folder is "
                        f"damaged") from None
    info = parse_json(text, str(path), "content")
    if not isinstance(info, dict) or not isinstance(info.get("train"), dict):
        raise UserError(f"{shown(path)} does not describe a run (no train settings)")
    return info


class RunFolder:
    """The run-folder side of the Trainer (a mixin: it uses the Trainer's run_dir, model,
    optimizer, schedule, EMA, position and history)."""

    def _last_good(self) -> str:
        """Where the last good checkpoint is, for a message."""
        if (self.run_dir / "last.state.pt").exists():
            return f"The last good checkpoint is {self.run_dir / 'last.state.pt'}"
        return "No checkpoint had been written yet"

    def _claim_run_dir(self) -> None:
        """Make the run folder this process's: refuse one that holds another run (unless this
        is its resume) or that another process is training in, and clean what an
        interrupted save left behind."""
        import fcntl
        if self._lock is not None:
            return
        # A new run makes its folder; it never adopts one that exists (a finished run's,
        # or a folder of the user's own files that the checkpoints would replace).
        try:
            self.run_dir.parent.mkdir(parents=True, exist_ok=True)
            self.run_dir.mkdir(exist_ok=self._owner)
            lock = os.open(self.run_dir, os.O_RDONLY)  # the folder itself is the lock
        except FileExistsError:
            raise UserError(self._taken()) from None
        except OSError as e:
            raise UserError(f"cannot write to run folder {self.run_dir}: {e.strerror or e}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            raise UserError(f"another process is training in {self.run_dir}; wait for it or "
                            f"choose another --name") from None
        self._lock, self._owner = lock, True
        ckpt.remove_partial_files(self.run_dir)
        # the metrics of the epochs the checkpoint holds, and no row of an epoch it lost
        ckpt.atomic_write(self.run_dir / "metrics.jsonl", lambda tmp: Path(tmp).write_text(
            "".join(json_row(r) + "\n" for r in self.history)))

    def _taken(self) -> str:
        """Why an existing run folder is not this new run's, in one sentence."""
        import fcntl
        d = shown(self.run_dir)
        try:
            fd = os.open(self.run_dir, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        except OSError:
            return f"another process is training in {d}; wait for it or choose another --name"
        if (self.run_dir / "config.json").exists():
            return (f"{d} already holds a run; continue it with `resnetkit train --resume {d}` "
                    f"or choose another --name")
        return (f"{d} already exists and is not a run of resnetkit (its files are left as they "
                f"are); choose another --name or --out_dir")

    def _release_run_dir(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def _prepare_run_dir(self) -> None:
        self._claim_run_dir()
        try:
            info = {"train": dataclasses.asdict(self.cfg),
                    "model": ckpt.config_to_dict(self.model.cfg),
                    "resolved": {"precision": self.precision, "channels_last": self.channels_last,
                                 "device": str(self.device), "image_size": self.image_size,
                                 "mean": self.mean, "std": self.std,
                                 "world_size": self.dist.world, "backend": self.dist.backend,
                                 "per_rank_batch": self.batches.per_rank,
                                 "global_batch": self.batches.global_, "lr": self.batches.lr},
                    "versions": {"resnetkit": version("resnetkit"), "torch": torch.__version__,
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
                 "history": json_row(self.history), "world_size": self.dist.world,
                 "torch_rng": torch.get_rng_state(), "epoch_partial": list(self._partial)}
        ckpt.save_state(self.run_dir / f"{which}.state.pt", state)
        ckpt.save_weights(self.run_dir / f"{which}.safetensors", self.eval_model, self.meta())

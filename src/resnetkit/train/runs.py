"""A training run's folder: claimed by one process at a time, its config, its checkpoints
(weights as safetensors, the rest as a training state), its metrics, TensorBoard log and
results. It writes what it is given; it knows nothing of the trainer."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from .. import weights as ckpt
from ..errors import UserError
from ..untrusted import parse_json, path_component, regular_file, shown


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


def last_state(run_dir: Path) -> Path:
    """The training state a resume continues from."""
    return Path(run_dir) / "last.state.pt"


def new_run_dir(out_dir: str, name: str, model: str, dataset: str) -> Path:
    """The folder of a new run: OUT_DIR/NAME, or OUT_DIR/MODEL-DATASET-TIME without a name.
    The name must be one plain path component (it came from the user)."""
    name = name or f"{model}-{dataset.split(':')[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(out_dir) / path_component(name, "run name")


def environment() -> dict[str, Any]:
    """What config.json records of the software a run was trained with, and its command."""
    return {"versions": {"resnetkit": version("resnetkit"), "torch": torch.__version__,
                         "python": platform.python_version()},
            "command": sys.argv}


class RunFolder:
    """The folder `path` of one run. A new run makes it (an existing folder is never
    adopted); a resumed one (`resuming`) continues in its own. While open, this process holds
    an exclusive lock on it, so two processes never train in one folder."""

    def __init__(self, path: Path, resuming: bool = False):
        self.path, self.resuming = Path(path), resuming
        self._lock: int | None = None
        self._tb = None

    def last_good(self) -> str:
        """Where the last good checkpoint is, for a message."""
        if last_state(self.path).exists():
            return f"The last good checkpoint is {last_state(self.path)}"
        return "No checkpoint had been written yet"

    def open(self, config: dict[str, Any], history: list[dict[str, Any]],
             tensorboard: bool, step: int = 0) -> None:
        """Claim the folder, write `config` as config.json and the metrics of the epochs in
        `history` (those the checkpoint holds, none it lost) as metrics.jsonl; start a
        TensorBoard log in RUN/tb when asked, from optimizer step `step` (a resumed run's
        position: what the log holds past it, written after the checkpoint, is dropped).
        Raises UserError if the folder is not this run's to write, or TensorBoard is not
        installed."""
        writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter as writer
            except ImportError:
                raise UserError("tensorboard=true needs TensorBoard: pip install "
                                "'resnetkit[tensorboard]'") from None
        self._claim()
        ckpt.atomic_write(self.path / "metrics.jsonl", lambda tmp: Path(tmp).write_text(
            "".join(json_row(r) + "\n" for r in history)))
        try:
            ckpt.atomic_write(self.path / "config.json",
                              lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1)))
        except OSError as e:
            raise UserError(f"cannot write to run folder {self.path}: {e.strerror or e}") from None
        self._tb = None
        if writer is not None:
            # TensorBoard drops the events at steps >= purge_step: everything logged after
            # the checkpoint at `step` (its own step and epoch rows stay)
            self._tb = writer(str(self.path / "tb"), purge_step=step + 1)

    def _claim(self) -> None:
        """Make the folder this process's: refuse one that holds another run (unless this is
        its resume) or that another process is training in, and clean what an interrupted
        save left behind."""
        import fcntl
        if self._lock is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # FileExistsError included: a file where a folder should be
            raise UserError(f"cannot write to run folder {self.path}: {e.strerror or e}") from None
        # A new run makes its folder; it never adopts one that exists (a finished run's,
        # or a folder of the user's own files that the checkpoints would replace).
        try:
            self.path.mkdir(exist_ok=self.resuming)
            lock = os.open(self.path, os.O_RDONLY)  # the folder itself is the lock
        except FileExistsError:
            raise UserError(self._taken()) from None
        except OSError as e:
            raise UserError(f"cannot write to run folder {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            raise UserError(f"another process is training in {self.path}; wait for it or "
                            f"choose another --name") from None
        self._lock, self.resuming = lock, True
        ckpt.remove_partial_files(self.path)

    def _taken(self) -> str:
        """Why an existing folder is not this new run's, in one sentence."""
        import fcntl
        d = shown(self.path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
        except OSError:
            return f"another process is training in {d}; wait for it or choose another --name"
        if (self.path / "config.json").exists():
            return (f"{d} already holds a run; continue it with `resnetkit train --resume {d}` "
                    f"or choose another --name")
        return (f"{d} already exists and is not a run of resnetkit (its files are left as they "
                f"are); choose another --name or --out_dir")

    def close(self) -> None:
        """Release the folder (and close the TensorBoard log); it can be opened again."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def log_step(self, step: int, loss: float, lr: float) -> None:
        """One optimizer step's mean training loss and learning rate, in the TensorBoard log
        (step/train_loss, step/lr) if there is one."""
        if self._tb is not None:
            self._tb.add_scalar("step/train_loss", loss, step)
            self._tb.add_scalar("step/lr", lr, step)

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float], step: int) -> None:
        """The run's hyperparameters and final metrics (at optimizer step `step`), for
        TensorBoard's HPARAMS tab (written into the run's own log, not a folder of its own)."""
        if self._tb is None:
            return
        from torch.utils.tensorboard.summary import hparams as summaries
        for summary in summaries(hparams, metrics):
            self._tb.file_writer.add_summary(summary)
        for k, v in metrics.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        """Append one epoch's metrics to metrics.jsonl (and to the TensorBoard log, as
        epoch/NAME at optimizer step `step`)."""
        try:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json_row(row) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self.path / 'metrics.jsonl'}: "
                            f"{e.strerror or e}") from None
        if self._tb is not None:
            for k, v in row.items():
                if v is not None:
                    self._tb.add_scalar(f"epoch/{k}", v, step)

    def save(self, which: str, state: dict[str, Any], weights: torch.nn.Module,
             meta: dict[str, Any]) -> None:
        """Write WHICH.state.pt (`state`, everything a resume needs) and WHICH.safetensors
        (`weights` with `meta`); state first, so a weights file never claims a position its
        state lacks."""
        ckpt.save_state(self.path / f"{which}.state.pt", state)
        ckpt.save_weights(self.path / f"{which}.safetensors", weights, meta)

    def write_results(self, result: dict[str, Any]) -> None:
        """results.json: the final metrics of the run."""
        (self.path / "results.json").write_text(json.dumps(result, indent=1))

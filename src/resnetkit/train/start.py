"""From command-line text to a Trainer: a new run, a resumed one, or a restarted group's."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..options import parse_fields
from .config import RESUMABLE, TrainConfig, build_config
from .resume import elastic_restart
from .trainer import Trainer


def start_run(recipe: str | None = None, options: dict[str, str] | None = None,
              resume: str | Path | None = None) -> Trainer:
    """A Trainer from command-line text: a new run from a recipe and "--key value" options,
    or the run folder `resume` continued (then only RESUMABLE options may be given). Under
    torchrun --max-restarts, a restarted group continues its named run from the last
    checkpoint. Raises UserError for options that do not fit."""
    options = options or {}
    if resume is None:
        cfg = build_config(recipe, options)
        restarted = elastic_restart(cfg)
        return Trainer.resume(restarted) if restarted is not None else Trainer(cfg)
    if recipe:
        raise UserError("--resume continues a run with its own recipe; drop --recipe")
    changes = parse_fields(TrainConfig, options, "train option")
    if set(changes) - set(RESUMABLE):
        raise UserError(f"with --resume only {' and '.join('--' + k for k in RESUMABLE)} "
                        f"may be given")
    return Trainer.resume(resume, **changes)

"""TrainConfig: every training choice as data; recipes are TOML files of its fields."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UserError

SCHEDULES = ("cosine", "step", "onecycle", "constant")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp64")
LR_SCALES = ("linear", "sqrt", "none")


@dataclass
class TrainConfig:
    """A training run. `model_overrides` are ResNetConfig fields (in_chans and num_classes
    are set from the data)."""

    model: str = "resnet20"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    image_size: int = 0                 # 0: the dataset's own size
    epochs: int = 2
    batch_size: int = 256               # per process and forward pass (unless global_batch)
    global_batch: int = 0               # samples per optimizer step over all processes
    accum_steps: int = 1                # forward/backward passes per optimizer step
    drop_last: bool = True              # skip the N mod global_batch samples left each epoch
    optimizer: str = "sgd"
    lr: float = 0.1
    lr_batch: int = 0                   # the global batch lr is meant for (0: batch_size)
    lr_scale: str = "linear"            # linear | sqrt | none: lr for the real global batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the run
    gamma: float = 0.1
    label_smoothing: float = 0.0
    ema_decay: float = 0.0              # 0: no EMA of weights
    grad_clip: float = 0.0              # 0: no clipping (max global L2 norm otherwise)
    crop_padding: int = 0               # pad-and-random-crop
    hflip: bool = False
    random_resized_crop: bool = False
    random_erasing: float = 0.0         # probability
    tta_flip: bool = False              # final test: average each image and its mirror image
    precision: str = "auto"
    channels_last: str = "auto"         # auto | true | false
    seed: int = 0
    deterministic: bool = False
    train_subset: int = 0               # 0: all training samples
    test_subset: int = 0                # 0: all test samples
    eval_every: int = 1                 # test every N epochs (and after the last)
    sync_bn: bool = False               # batch statistics over all processes
    dist_timeout: float = 300.0         # seconds a collective may wait for the other ranks
    out_dir: str = "runs"
    name: str = ""
    plots: bool = True
    tensorboard: bool = False
    on_bad_image: str = "skip"          # image folders: skip (warn) or error
    workers: int = 2
    cache_images: str = "auto"          # image folders: auto | true (decode into memory) | false (stream)
    threads: int = 0                    # 0: torch's default

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}"),
            (self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}"),
            (str(self.channels_last).lower() in ("auto", "true", "false"), "channels_last",
             "auto, true or false"),
            (self.epochs >= 1, "epochs", ">= 1"), (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.lr > 0, "lr", "> 0"), (0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
            (0 <= self.random_erasing <= 1, "random_erasing", "in [0, 1]"),
            (self.on_bad_image in ("skip", "error"), "on_bad_image", "skip or error"),
            (str(self.cache_images).lower() in ("auto", "true", "false"), "cache_images",
             "auto, true or false"),
            (self.workers >= 0, "workers", ">= 0"),
            (self.warmup_epochs >= 0, "warmup_epochs", ">= 0"),
            (self.global_batch >= 0, "global_batch", ">= 0"),
            (self.accum_steps >= 1, "accum_steps", ">= 1"),
            (self.lr_batch >= 0, "lr_batch", ">= 0"),
            (self.lr_scale in LR_SCALES, "lr_scale", f"one of {LR_SCALES}"),
            (self.dist_timeout > 0, "dist_timeout", "> 0"),
            (self.eval_every >= 1, "eval_every", ">= 1"),
            (self.train_subset >= 0 and self.test_subset >= 0, "train_subset", ">= 0"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise UserError(f"train option {name}={getattr(self, name)!r} is invalid: "
                                f"must be {allowed}")


def _coerce(name: str, raw: str, current: Any) -> Any:
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, list):
            return [float(v) for v in raw.split(",") if v]
        if isinstance(current, dict):
            from ..config import parse_override
            return dict(parse_override(t) for t in raw.split(";") if t)
        return None if raw.lower() == "none" and current is None else raw
    except ValueError:
        raise UserError(f"train option {name} expects a {type(current).__name__}, "
                        f"got {raw!r}") from None


def recipe_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in
                  resources.files("resnetkit").joinpath("recipes").iterdir()
                  if p.name.endswith(".toml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe by name (shipped under resnetkit/recipes/) or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        text = path.read_text()
    else:
        res = resources.files("resnetkit").joinpath("recipes", f"{name_or_path}.toml")
        if not res.is_file():
            raise UserError(f"unknown recipe {name_or_path!r}; recipes: {', '.join(recipe_names())}")
        text = res.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {name_or_path} is not valid TOML: {e}") from None
    data.pop("description", None)
    return data


def build_config(recipe: str | None = None, overrides: dict[str, str] | None = None,
                 **values: Any) -> TrainConfig:
    """A recipe, then typed values, then "--key value" strings from the command line."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    data: dict[str, Any] = load_recipe(recipe) if recipe else {}
    data.update(values)
    unknown = sorted(set(data) - set(fields)) + sorted(set(overrides or {}) - set(fields))
    if unknown:
        raise UserError(f"unknown train option(s) {', '.join(unknown)}; options: "
                        f"{', '.join(fields)}")
    cfg = TrainConfig(**data)
    for k, raw in (overrides or {}).items():
        setattr(cfg, k, _coerce(k, raw, getattr(cfg, k)))
    cfg.__post_init__()
    return cfg

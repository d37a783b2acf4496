"""TrainConfig: every training choice as data; recipes are TOML files of its fields."""
from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ..errors import UserError
from ..evaluate import TTA_MAX_SHIFT
from ..options import convert, field_types, fits, kind_name, parse_fields
from ..untrusted import path_component, regular_file, shown

SCHEDULES = ("cosine", "step", "onecycle", "constant")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "bf16", "fp16", "fp32", "fp64")
LR_SCALES = ("linear", "sqrt", "none")
# What a resumed run may change: it may run longer, or split its steps differently.
RESUMABLE = ("epochs", "accum_steps")
Auto = Literal["auto"]


def opt(default: Any, help: str) -> Any:
    """A TrainConfig field with its help text (shown by `resnetkit train --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """A training run. `model_overrides` are ResNetConfig fields (in_chans and num_classes
    are set from the data)."""

    model: str = opt("resnet20", "preset name (see `resnetkit models`)")
    model_overrides: dict[str, Any] = opt({}, "ResNetConfig fields, key=value;key=value "
                                              "(in_chans and num_classes come from the data)")
    dataset: str = opt("fashion-mnist", "fashion-mnist, idx:DIR, cifar:DIR or folder:DIR")
    data_dir: str | None = opt(None, "folder of the dataset's files (default: its usual place)")
    image_size: int = opt(0, "input side the images are resized to (0: the dataset's own)")
    classes: list[int] = opt([], "keep only these class indices, renumbered from 0 (e.g. 5,6,7,8,9)")
    per_class: int = opt(0, "train on a fixed random N images of each class (0: all)")
    init: str = opt("", "start from these weights: a registry tag, a weights file or a run "
                        "folder (a head of another size, or for other classes, starts fresh)")
    freeze: list[str] = opt([], "parts that do not learn: stem, layer1..layer4 or backbone")
    freeze_bn: bool = opt(False, "BatchNorm with fixed statistics and affine (FrozenBatchNorm2d)")
    whiten_stem: bool = opt(False, "the first conv fixed at a whitening of the training "
                                   "images' patches (airbench's first layer)")
    head_lr_mult: float = opt(1.0, "learning-rate multiplier of the classifier")
    epochs: int = opt(2, "passes over the training set")
    batch_size: int = opt(256, "samples per process and forward pass (unless global_batch)")
    global_batch: int = opt(0, "samples per optimizer step over all processes (0: batch_size "
                               "x processes x accum_steps)")
    accum_steps: int = opt(1, "forward/backward passes per optimizer step")
    drop_last: bool = opt(True, "skip the N mod global_batch samples left each epoch")
    optimizer: str = opt("sgd", f"one of {', '.join(OPTIMIZERS)}")
    lr: float = opt(0.1, "peak learning rate, for lr_batch samples per step")
    lr_batch: int = opt(0, "the global batch lr is meant for (0: batch_size)")
    lr_scale: str = opt("linear", "linear | sqrt | none: lr for the real global batch")
    momentum: float = opt(0.9, "SGD momentum (AdamW's beta1)")
    nesterov: bool = opt(False, "Nesterov momentum (SGD)")
    weight_decay: float = opt(5e-4, "L2 weight decay (not on BN parameters and biases)")
    bn_lr_mult: float = opt(1.0, "learning-rate multiplier of BN parameters and biases")
    bn_weight_decay: float = opt(0.0, "L2 weight decay of BN parameters and biases")
    bn_scale_fixed: bool = opt(False, "BN scales (gamma) kept at their start (1, or --init's), "
                                      "only the shifts learn (airbench)")
    schedule: str = opt("onecycle", f"learning-rate schedule: one of {', '.join(SCHEDULES)}")
    warmup_epochs: float = opt(0.0, "linear warm-up, in epochs")
    milestones: list[float] = opt([0.5, 0.75], "step schedule: where lr drops, as fractions "
                                                "of the run, e.g. 0.5,0.75")
    gamma: float = opt(0.1, "step schedule: lr factor at each milestone")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy, in [0, 1)")
    ema_decay: float = opt(0.0, "exponential moving average of the weights (0: none)")
    grad_clip: float = opt(0.0, "max global L2 norm of the gradients (0: no clipping)")
    crop_padding: int = opt(0, "pad by N pixels, then crop at random (0: off)")
    hflip: bool = opt(False, "random horizontal flips")
    alternate_flip: bool = opt(False, "with hflip: each image mirrored in every other epoch "
                                      "from a random start, not at random each time")
    random_resized_crop: bool = opt(False, "random resized crops (Inception-style)")
    random_erasing: float = opt(0.0, "probability of erasing a random rectangle")
    tta_flip: bool = opt(False, "final test: average each image and its mirror image")
    tta_shift: int = opt(0, "final test: also each view shifted N pixels up, down, left and "
                            "right, at half weight (0: off)")
    precision: str = opt("auto", "auto (bf16 where native, fp16 on other GPUs, else fp32), "
                                 "bf16, fp16, fp32 or fp64")
    channels_last: Auto | bool = opt("auto", "channels_last memory format: auto, true or false")
    compile: Auto | bool = opt("auto", "torch.compile the training step: auto (runs long enough "
                               "to pay for it, one process, a C++ compiler), true or false")
    fused_bn: Auto | bool = opt("auto", "BN, the residual sum and ReLU as one C++ kernel each "
                                "way in the eager training step: auto (CPU, channels_last, "
                                "not compiled), true or false")
    seed: int = opt(0, "seed of the initial weights, the order and the augmentation")
    deterministic: bool = opt(False, "deterministic algorithms only (bitwise-repeatable)")
    train_subset: int = opt(0, "train on a fixed random N samples (0: all)")
    test_subset: int = opt(0, "test on a fixed random N samples (0: all)")
    eval_every: int = opt(1, "test every N epochs (and after the last)")
    sync_bn: bool = opt(False, "batch statistics over all processes")
    dist_timeout: float = opt(300.0, "seconds a collective may wait for the other ranks")
    save_every_steps: int = opt(0, "also save a resumable checkpoint every N optimizer steps "
                                   "(0: at epoch ends only); a restarted torchrun group resumes "
                                   "from it")
    out_dir: str = opt("runs", "folder of the run folders")
    name: str = opt("", "run folder name (default: model-dataset-time)")
    plots: bool = opt(True, "write curves and a confusion matrix (PNG) at the end")
    tensorboard: bool = opt(False, "write TensorBoard logs to RUN/tb")
    on_bad_image: str = opt("skip", "image folders: skip (warn) or error")
    workers: int = opt(2, "image folders: decoding processes")
    cache_images: Auto | bool = opt("auto", "image folders: auto, true (decode into memory) or "
                                            "false (stream from disk)")
    threads: int = opt(0, "CPU threads (0: torch's default)")

    def __post_init__(self) -> None:
        # "true" from a recipe or a caller
        for name in ("channels_last", "compile", "fused_bn", "cache_images"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, convert(Auto | bool, value))
                except ValueError:
                    pass  # reported by the check below
        # a recipe file or a run's config.json is untrusted: types first, then ranges
        for name, tp in field_types(TrainConfig).items():
            if not fits(getattr(self, name), tp):
                raise UserError(f"train option {name}={shown(repr(getattr(self, name)))[:80]} "
                                f"is invalid: must be of type {'finite ' if tp is float else ''}"
                                f"{kind_name(tp)}")
        if self.name:  # the run folder's name: one component inside out_dir, never a path
            path_component(self.name, "run name (--name)")
        checks = [
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}"),
            (self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}"),
            (self.channels_last in ("auto", True, False), "channels_last", "auto, true or false"),
            (self.compile in ("auto", True, False), "compile", "auto, true or false"),
            (self.fused_bn in ("auto", True, False), "fused_bn", "auto, true or false"),
            (self.epochs >= 1, "epochs", ">= 1"), (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "> 0 and finite"),
            (0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
            (0 <= self.random_erasing <= 1, "random_erasing", "in [0, 1]"),
            (self.on_bad_image in ("skip", "error"), "on_bad_image", "skip or error"),
            (self.cache_images in ("auto", True, False), "cache_images", "auto, true or false"),
            (self.workers >= 0, "workers", ">= 0"),
            (self.warmup_epochs >= 0, "warmup_epochs", ">= 0"),
            (self.global_batch >= 0, "global_batch", ">= 0"),
            (self.accum_steps >= 1, "accum_steps", ">= 1"),
            (self.lr_batch >= 0, "lr_batch", ">= 0"),
            (self.lr_scale in LR_SCALES, "lr_scale", f"one of {LR_SCALES}"),
            (self.dist_timeout > 0, "dist_timeout", "> 0"),
            (self.eval_every >= 1, "eval_every", ">= 1"),
            (self.train_subset >= 0 and self.test_subset >= 0, "train_subset", ">= 0"),
            (self.per_class >= 0, "per_class", ">= 0"),
            (self.save_every_steps >= 0, "save_every_steps", ">= 0"),
            (0 <= self.momentum < 1, "momentum", "in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.bn_weight_decay >= 0, "bn_weight_decay", ">= 0"),
            (self.bn_lr_mult > 0, "bn_lr_mult", "> 0"),
            (self.hflip or not self.alternate_flip, "alternate_flip", "needs hflip=true"),
            (not (self.bn_scale_fixed and isinstance(self.model_overrides, dict)
                  and self.model_overrides.get("zero_init_residual") not in (None, False)),
             "bn_scale_fixed", "would keep zero_init_residual's zeroed BN scales at zero"),
            (0 <= self.tta_shift <= TTA_MAX_SHIFT, "tta_shift",
             f"from 0 to {TTA_MAX_SHIFT} pixels"),
            (not (self.whiten_stem and self.init), "whiten_stem",
             "replaces the first conv, so it cannot start from --init weights"),
            (0 <= self.seed < 2 ** 31, "seed", "from 0 to 2**31 - 1"),
            (self.grad_clip >= 0, "grad_clip", ">= 0 (0: no clipping)"),
            (isinstance(self.model_overrides, dict) and "num_classes" not in self.model_overrides,
             "model_overrides", "ResNetConfig fields except num_classes, which comes from the "
             "dataset (choose classes with --classes)"),
            (all(isinstance(c, int) and c >= 0 for c in self.classes), "classes",
             "class indices >= 0"),
            (self.head_lr_mult > 0 and math.isfinite(self.head_lr_mult), "head_lr_mult", "> 0"),
            (self.threads >= 0, "threads", ">= 0 (0: torch's default)"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise UserError(f"train option {name}={shown(repr(getattr(self, name)))} is invalid: "
                                f"must be {allowed}")


def recipe_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in
                  resources.files("resnetkit").joinpath("recipes").iterdir()
                  if p.name.endswith(".toml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe by name (shipped under resnetkit/recipes/) or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        try:
            text = regular_file(path, "recipe").read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read recipe {shown(path)}: {e}") from None
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
    """A recipe, then typed values, then "--key value" strings from the command line (parsed
    by the field types, as every command-line value is)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    data: dict[str, Any] = load_recipe(recipe) if recipe else {}
    data.update(values)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise UserError(f"unknown train option(s) {', '.join(unknown)}; options: "
                        f"{', '.join(sorted(fields))}")
    data.update(parse_fields(TrainConfig, overrides or {}, "train option"))
    return TrainConfig(**data)

"""Named presets (one line each) and create_model / list_models."""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from functools import partial
from typing import Any

from .config import ResNetConfig
from .errors import UserError
from .model import ResNet

Basic = partial(ResNetConfig, block="basic")
Bottleneck = partial(ResNetConfig, block="bottleneck")
# The paper's CIFAR nets (section 4.2): 3x3 stem of 16, stages of 16/32/64, n blocks each,
# option-A shortcuts, depth 6n + 2.
Cifar = partial(ResNetConfig, block="basic", widths=(16, 32, 64), stem="cifar", stem_width=16,
                shortcut="A", num_classes=10)

PRESETS: dict[str, ResNetConfig] = {
    "resnet18": Basic(layers=(2, 2, 2, 2)),
    "resnet34": Basic(layers=(3, 4, 6, 3)),
    "resnet50": Bottleneck(layers=(3, 4, 6, 3)),
    "resnet101": Bottleneck(layers=(3, 4, 23, 3)),
    "resnet152": Bottleneck(layers=(3, 8, 36, 3)),
    "resnet50_v1": Bottleneck(layers=(3, 4, 6, 3), stride_in_1x1=True),
    "resnet101_v1": Bottleneck(layers=(3, 4, 23, 3), stride_in_1x1=True),
    "resnet152_v1": Bottleneck(layers=(3, 8, 36, 3), stride_in_1x1=True),
    "resnext50_32x4d": Bottleneck(layers=(3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": Bottleneck(layers=(3, 4, 23, 3), groups=32, width_per_group=8),
    "resnext101_64x4d": Bottleneck(layers=(3, 4, 23, 3), groups=64, width_per_group=4),
    "wide_resnet50_2": Bottleneck(layers=(3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": Bottleneck(layers=(3, 4, 23, 3), width_per_group=128),
    "resnet50d": Bottleneck(layers=(3, 4, 6, 3), stem="deep", avg_down=True),
    "resnet18v2": ResNetConfig(block="preact_basic", layers=(2, 2, 2, 2)),
    "resnet50v2": ResNetConfig(block="preact_bottleneck", layers=(3, 4, 6, 3)),
    **{f"resnet{6 * n + 2}": Cifar(layers=(n, n, n)) for n in (3, 5, 7, 9, 18, 200)},
}


def replace(cfg: ResNetConfig, **overrides: Any) -> ResNetConfig:
    """dataclasses.replace with an error that names unknown fields."""
    fields = [f.name for f in dataclasses.fields(ResNetConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise UserError(f"unknown config field(s) {', '.join(unknown)}; "
                        f"fields are: {', '.join(fields)}")
    return dataclasses.replace(cfg, **overrides)


def list_models(pattern: str = "*") -> list[str]:
    """Preset names matching a shell-style pattern, e.g. "resnext*"."""
    return sorted(n for n in PRESETS if fnmatch.fnmatch(n, pattern))


def get_config(name: str, **overrides: Any) -> ResNetConfig:
    """The preset's config with overrides applied. Unknown names suggest the closest ones."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else \
            f"known models: {', '.join(list_models())}"
        raise UserError(f"unknown model {name!r}; {hint}")
    return replace(PRESETS[name], **overrides)


def create_model(name: str | ResNetConfig, features_only: bool = False,
                 out_indices: tuple[int, ...] | None = None, **overrides: Any) -> ResNet:
    """Build a model from a preset name (or a config), e.g.
    create_model("resnet50", stride_in_1x1=True, num_classes=10)."""
    cfg = replace(name, **overrides) if isinstance(name, ResNetConfig) else \
        get_config(name, **overrides)
    return ResNet(cfg, features_only=features_only, out_indices=out_indices)

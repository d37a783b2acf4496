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
# timm's variants (timm/models/resnet.py): "c" deep stem, "d" deep stem + avg-down shortcuts,
# "s" deep stem of twice the width; SE nets with timm's SE (ratio 1/16, width rounded to 8).
# timm's deep stem of stem_width w outputs 2w: our stem_width is that output.
D = dict(stem="deep", avg_down=True)
SE = dict(se_ratio=1 / 16)
B18, B34, B26 = (2, 2, 2, 2), (3, 4, 6, 3), (2, 2, 2, 2)
B50, B101, B152, B200 = (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3), (3, 24, 36, 3)
# timm's resnetv2 (timm/models/resnetv2.py): pre-activation, a bare conv stem (no BN + ReLU),
# torchvision-style stride on the 3x3
V2 = dict(stem_norm=False)

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
    # the paper's plain nets (figure 3, section 4.2): the same layers without shortcuts
    "plain18": Basic(layers=(2, 2, 2, 2), shortcut="none"),
    "plain34": Basic(layers=(3, 4, 6, 3), shortcut="none"),
    **{f"plain{6 * n + 2}": Cifar(layers=(n, n, n), shortcut="none") for n in (3, 5, 7, 9, 18)},
    # timm's names
    "resnet26": Bottleneck(layers=B26),
    "resnet200": Bottleneck(layers=B200),
    "resnet18d": Basic(layers=B18, **D),
    "resnet34d": Basic(layers=B34, **D),
    "resnet26d": Bottleneck(layers=B26, **D),
    "resnet101d": Bottleneck(layers=B101, **D),
    "resnet152d": Bottleneck(layers=B152, **D),
    "resnet200d": Bottleneck(layers=B200, **D),
    "resnet50c": Bottleneck(layers=B50, stem="deep"),
    "resnet101c": Bottleneck(layers=B101, stem="deep"),
    "resnet152c": Bottleneck(layers=B152, stem="deep"),
    "resnet50s": Bottleneck(layers=B50, stem="deep", stem_width=128),
    "resnet101s": Bottleneck(layers=B101, stem="deep", stem_width=128),
    "resnet152s": Bottleneck(layers=B152, stem="deep", stem_width=128),
    "resnet50_gn": Bottleneck(layers=B50, norm_layer="groupnorm"),
    "resnext50d_32x4d": Bottleneck(layers=B50, groups=32, width_per_group=4, **D),
    "resnext101_32x4d": Bottleneck(layers=B101, groups=32, width_per_group=4),
    "resnext101_32x16d": Bottleneck(layers=B101, groups=32, width_per_group=16),
    "seresnet18": Basic(layers=B18, **SE),
    "seresnet34": Basic(layers=B34, **SE),
    "seresnet50": Bottleneck(layers=B50, **SE),
    "seresnet101": Bottleneck(layers=B101, **SE),
    "seresnet152": Bottleneck(layers=B152, **SE),
    "seresnet152d": Bottleneck(layers=B152, **D, **SE),
    "seresnext26d_32x4d": Bottleneck(layers=B26, groups=32, width_per_group=4, **D, **SE),
    "seresnext50_32x4d": Bottleneck(layers=B50, groups=32, width_per_group=4, **SE),
    "seresnext101_32x4d": Bottleneck(layers=B101, groups=32, width_per_group=4, **SE),
    "seresnext101_32x8d": Bottleneck(layers=B101, groups=32, width_per_group=8, **SE),
    "seresnext101_64x4d": Bottleneck(layers=B101, groups=64, width_per_group=4, **SE),
    "resnetv2_18": ResNetConfig(block="preact_basic", layers=B18, **V2),
    "resnetv2_18d": ResNetConfig(block="preact_basic", layers=B18, **V2, **D),
    "resnetv2_34": ResNetConfig(block="preact_basic", layers=B34, **V2),
    "resnetv2_34d": ResNetConfig(block="preact_basic", layers=B34, **V2, **D),
    "resnetv2_50": ResNetConfig(block="preact_bottleneck", layers=B50, **V2),
    "resnetv2_50d": ResNetConfig(block="preact_bottleneck", layers=B50, **V2, **D),
    "resnetv2_101": ResNetConfig(block="preact_bottleneck", layers=B101, **V2),
    "resnetv2_101d": ResNetConfig(block="preact_bottleneck", layers=B101, **V2, **D),
    "resnetv2_152": ResNetConfig(block="preact_bottleneck", layers=B152, **V2),
    "resnetv2_152d": ResNetConfig(block="preact_bottleneck", layers=B152, **V2, **D),
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


def is_model(name: str) -> bool:
    """Whether `name` is a preset (timm's is_model)."""
    return name in PRESETS


def get_config(name: str, **overrides: Any) -> ResNetConfig:
    """The preset's config with overrides applied. Unknown names suggest the closest ones."""
    if not isinstance(name, str):
        raise UserError(f"a model is named by a string (see list_models()), not by a "
                        f"{type(name).__name__}")
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else \
            f"known models: {', '.join(list_models())}"
        raise UserError(f"unknown model {name!r}; {hint}")
    return replace(PRESETS[name], **overrides)


# torchvision passes norm_layer as a class: its name says which of ours it is
NORM_CLASSES = {"BatchNorm2d": "batchnorm", "FrozenBatchNorm2d": "frozen_batchnorm",
                "GroupNorm": "groupnorm"}


def create_model(name: str | ResNetConfig, features_only: bool = False,
                 out_indices: tuple[int, ...] | None = None, **overrides: Any) -> ResNet:
    """Build a model from a preset name (or a config), e.g.
    create_model("resnet50", stride_in_1x1=True, num_classes=10). norm_layer may also be
    given as a class, as torchvision takes it (torchvision.ops.FrozenBatchNorm2d, ...)."""
    norm = overrides.get("norm_layer")
    if isinstance(norm, type):
        if norm.__name__ not in NORM_CLASSES:
            raise UserError(f"norm_layer {norm.__name__} is not available: choose "
                            f"{', '.join(NORM_CLASSES)} (or their names "
                            f"{', '.join(NORM_CLASSES.values())})")
        overrides["norm_layer"] = NORM_CLASSES[norm.__name__]
    cfg = replace(name, **overrides) if isinstance(name, ResNetConfig) else \
        get_config(name, **overrides)
    return ResNet(cfg, features_only=features_only, out_indices=out_indices)
